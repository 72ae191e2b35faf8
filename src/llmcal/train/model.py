"""The model side of fine-tuning: load for training, add LoRA, save the adapter (and a merged model).

* The base loads through ``llmcal.models.load_model`` (GGUF files become a
  plain safetensors model that Trainer can train).  With ``--preset paper``
  on a GPU with bitsandbytes installed, the base weights load in 4 bits
  (QLoRA: NF4, double quantisation, bf16 compute) instead.
* A model that is already a LoRA adapter is trained further as it is (its own
  rank, alpha and target modules); anything else gets a new LoRA adapter
  (peft ``LoraConfig``, task CAUSAL_LM) initialised from the run's seed.
  Either way the adapters' dropout draws its CPU masks with ``dropout.CpuMaskDropout``.
* The adapter is saved with the tokenizer and ``llmcal_base.json`` (the full
  base-model spec), so ``resolve_model(adapter)`` reloads it on the right base.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..errors import LlmcalError
from ..models import (ADAPTER_BASE_FILE, LoadedModel, ModelSpec, _from_pretrained, dtype_name, load_model,
                      load_tokenizer, weights_dir)
from .config import FinetuneConfig
from .dropout import use_cpu_mask_dropout

log = logging.getLogger(__name__)


def resolve_train_dtype(cfg: FinetuneConfig, device: str) -> str:
    """``bf16-if-supported`` (the paper preset): bfloat16 on a GPU that has it, else float32."""
    if cfg.dtype != "bf16-if-supported":
        return cfg.dtype
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def use_4bit(cfg: FinetuneConfig, device: str) -> bool:
    return (cfg.preset == "paper" and device.startswith("cuda")
            and importlib.util.find_spec("bitsandbytes") is not None)


def load_for_training(spec: ModelSpec, cfg: FinetuneConfig, device: str) -> LoadedModel:
    dtype = resolve_train_dtype(cfg, device)
    if use_4bit(cfg, device) and spec.kind != "lora":
        return _load_4bit(spec, device)
    return load_model(spec, dtype=dtype, device=device, trainable=True)


def _load_4bit(spec: ModelSpec, device: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    index = torch.device(device).index or 0
    model = _from_pretrained(AutoModelForCausalLM, weights_dir(spec), quantization_config=q,
                             dtype=torch.bfloat16, device_map={"": index})
    tok = load_tokenizer(spec)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, device=device, dtype=dtype_name(torch.bfloat16),
                       extra={"quantization": "nf4"})


def target_modules(cfg: FinetuneConfig):
    t = cfg.target_modules
    if isinstance(t, str) and t != "all-linear":
        return [m.strip() for m in t.split(",") if m.strip()]
    return t


def add_lora(loaded: LoadedModel, cfg: FinetuneConfig):
    """The trainable peft model: the adapter given as --model, or a new LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = loaded.model
    if isinstance(model, PeftModel):
        log.info("training the adapter %s further (its own LoRA settings apply)", loaded.spec.path)
        use_cpu_mask_dropout(model)
        model.train()
        return model
    if loaded.extra.get("quantization"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=target_modules(cfg), task_type="CAUSAL_LM")
    set_seed(cfg.seed)  # the LoRA initialisation
    try:
        with warnings.catch_warnings():  # peft asks a transformers property that is being renamed
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lc)
    except ValueError as e:
        raise LlmcalError(f"cannot add LoRA to {loaded.spec.name} with target modules {cfg.target_modules!r}: {e}")
    use_cpu_mask_dropout(model)  # peft's dropout draws its CPU masks slowly (train/dropout.py)
    model.train()
    return model


def base_spec(spec: ModelSpec) -> ModelSpec:
    return spec.base if spec.kind == "lora" and spec.base is not None else spec


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_adapter(model, tokenizer, spec: ModelSpec, out: Path) -> Path:
    """Write the adapter, the tokenizer and llmcal_base.json into ``out`` (atomically, as one directory)."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_BASE_FILE).write_text(json.dumps({"base": base_spec(spec).to_dict()}, indent=2))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_merged(model, tokenizer, out: Path) -> Path:
    """Merge the adapter into the base weights and save a plain model (the peft model is consumed)."""
    out = Path(out)
    merged = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

