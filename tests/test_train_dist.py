"""Data-parallel fine-tuning with two CPU processes (torchrun, gloo) on a tiny model."""
from __future__ import annotations

import json

import pytest

from conftest import run_two_processes

SCRIPT = r'''
import json, os, sys

import llmcal.train.state as state
from llmcal.train import FinetuneConfig, run_finetune

out, model = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
set_targets = state.TrainState.set_targets


def recording(self, accuracy, tag, record):  # every E-step, as this rank sees it
    set_targets(self, accuracy, tag, record)
    with open(os.path.join(out, f"estep-rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"tag": tag, "targets": self.targets, "count": record["count"]}) + "\n")


state.TrainState.set_targets = recording
cfg = FinetuneConfig(model=model, train="synthetic:facts?n=24&k=4", evals=["synthetic:arithmetic?n=12&k=4"],
                     method="rcft", epochs=2, batch_size=4, lr=5e-3, template="plain", device="cpu", drift=False,
                     n_bootstrap=20)
rec = run_finetune(cfg, os.path.join(out, "run"), progress=False)
with open(os.path.join(out, f"done-rank{rank}.json"), "w") as f:
    json.dump({"world_size": rec.meta["world_size"], "n_heldout": rec.meta["n_heldout"],
               "labels": [r.label for r in rec.results], "steps": rec.meta["global_step"]}, f)
'''


@pytest.mark.heavy
def test_two_processes_train_with_identical_estep_statistics(tmp_path, tiny_model_dir):
    run_two_processes(tmp_path, "finetune_dist.py", SCRIPT, tiny_model_dir, timeout=600)

    done = [json.loads((tmp_path / f"done-rank{r}.json").read_text()) for r in (0, 1)]
    assert done[0] == done[1]
    assert done[0]["world_size"] == 2 and done[0]["labels"] == ["none", "rcft"]
    # ~19 training questions, batch 4 per process: 3 optimizer steps per epoch with 2 processes
    assert done[0]["steps"] == 6
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "adapter").is_dir()

    esteps = [(tmp_path / f"estep-rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(esteps[0]) == 2 and esteps[0] == esteps[1]  # one E-step per epoch, identical on both ranks
    for line in esteps[0]:
        # each rank scored its share of the held-out slice; the sums cover all of it
        assert sum(json.loads(line)["count"]) == done[0]["n_heldout"]
