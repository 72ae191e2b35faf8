"""train/launch.py: run_finetune in the processes llmcal starts itself (--processes)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import llmcal.train.launch as launch
from llmcal.errors import LlmcalError
from llmcal.train import FinetuneConfig, run_finetune
from llmcal.train.config import validate


def test_auto_is_two_processes_on_a_cpu_with_two_cores_and_an_even_batch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    assert launch.resolve_processes("auto", 4, "cpu") == 2
    assert launch.resolve_processes("auto", 3, "cpu") == 1  # an odd batch cannot be split evenly
    assert launch.resolve_processes(3, 3, "cpu") == 3
    monkeypatch.setattr(launch, "cpu_cores", lambda: 1)
    assert launch.resolve_processes("auto", 4, "cpu") == 1


def test_a_users_launcher_decides(monkeypatch):
    monkeypatch.setattr(launch, "cpu_cores", lambda: 16)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch.resolve_processes("auto", 4, "cpu") == 1
    assert launch.resolve_processes(2, 4, "cpu") == 1
    assert launch.per_process_batch(4) == 4  # under torchrun --batch-size is per process, as it always was
    monkeypatch.setenv(launch.LAUNCHED_ENV, "2")
    assert launch.per_process_batch(4) == 2  # in the group llmcal started, the batch is split


@pytest.mark.parametrize("processes, batch, message", [
    (0, 4, "--processes must be auto or a positive integer"),
    ("two", 4, "--processes must be auto or a positive integer"),
    (2, 3, "does not split evenly"),
])
def test_bad_processes_are_refused_before_anything_loads(processes, batch, message):
    with pytest.raises(LlmcalError, match=message):  # a bad value when the config is built, a bad pair by validate
        validate(FinetuneConfig(model="m", train="t", evals=["e"], processes=processes, batch_size=batch))


def _config(model_dir, processes: int) -> FinetuneConfig:
    # Dropout off: its masks come from each process's own generator, the one thing that differs by design.
    return FinetuneConfig(model=str(model_dir), train="synthetic:arithmetic?n=24&k=4",
                          evals=["synthetic:compare?n=8&k=4"], method="cft", epochs=2, batch_size=4,
                          lr=1e-2, lora_dropout=0.0, heldout_fraction=0.0, template="plain", device="cpu",
                          dtype="float32", drift=False, n_bootstrap=20, processes=processes)


def test_two_processes_train_the_same_model_as_one(tmp_path, tiny_model_dir):
    """Same batches, same mean gradients: the adapters after 12 steps agree to float32 round-off."""
    one = run_finetune(_config(tiny_model_dir, 1), tmp_path / "one", progress=False)
    two = run_finetune(_config(tiny_model_dir, 2), tmp_path / "two", progress=False)
    assert (one.meta["world_size"], two.meta["world_size"]) == (1, 2)
    assert one.meta["global_step"] == two.meta["global_step"] == 12
    assert two.meta["train_loss"] == pytest.approx(one.meta["train_loss"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-4, moved
    assert any(float(a[k].abs().max()) > 1e-3 for k in a if "lora_B" in k)  # training moved the adapter
    # The evaluation after training sees the same model.
    pa = [r for r in one.results if r.label == "cft"][0].metrics["accuracy"]
    pb = [r for r in two.results if r.label == "cft"][0].metrics["accuracy"]
    assert pa == pb
    assert torch.get_num_threads() >= 1


def test_an_error_in_a_training_process_is_one_llmcal_error(tmp_path, tiny_model_dir):
    cfg = dataclasses.replace(_config(tiny_model_dir, 2), training_args={"optim": "no_such_optimizer"})
    with pytest.raises(LlmcalError):
        run_finetune(cfg, tmp_path / "bad", progress=False)


@pytest.mark.slow
def test_a_gguf_model_is_converted_once_before_the_processes_start(tmp_path, monkeypatch):
    import torch.distributed.launcher.api as api

    from llmcal.models import cache_dir

    seen = {}

    def fake_launch(config, entrypoint):
        def run(*args):
            seen["caches"] = sorted(p.name.rsplit("-", 1)[-1] for p in (cache_dir() / "gguf").iterdir())
            return {0: "stop here", 1: "stop here"}
        return run

    monkeypatch.setattr(api, "elastic_launch", fake_launch)
    monkeypatch.setenv("LLMCAL_CACHE", str(tmp_path / "cache"))  # not the session's cache, which other tests fill
    cfg = FinetuneConfig(model="smollm2-135m-instruct", train="t", evals=["e"], dtype="bfloat16", device="cpu")
    with pytest.raises(LlmcalError, match="stop here"):
        launch.launch_finetune(cfg, tmp_path / "run", processes=2, overwrite=False, progress=False)
    assert seen["caches"] == ["bfloat16", "tokenizer"]  # in the training dtype, before any process started
