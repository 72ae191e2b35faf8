"""``llmcal demo``: the embedded default, end to end, offline.

smollm2-135m-instruct (SFT+DPO aligned) on a fixed MMLU subset with the chat
template -> temperature scaling fitted on a calibration split -> the side-by-side
report.  Each step is a normal run directory, so an interrupted demo resumes.
"""
from __future__ import annotations

from pathlib import Path

from .evaluate import EvalConfig, run_calibrate_ts
from .models import load_model, resolve_model

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_DATA = "mmlu"


def run_demo(out: str | Path, *, limit: int = 300, overwrite: bool = False, console=None) -> Path:
    from .report.runreport import write_comparison
    from .runs import RunDir

    out = Path(out)
    say = console.print if console is not None else (lambda *a, **k: None)
    cfg = EvalConfig(model=DEMO_MODEL, data=DEMO_DATA, limit=limit, seed=0, template="chat", dtype="float32",
                     device="cpu", method="ts")
    ts_dir = out / "ts"
    if overwrite or not RunDir(ts_dir).is_complete:
        say(f"[bold]1/2[/] {DEMO_MODEL} on {limit} MMLU questions (chat template), temperature scaling")
        spec = resolve_model(DEMO_MODEL)
        loaded = load_model(spec, dtype="float32", device="cpu")
        run_calibrate_ts(cfg, ts_dir, overwrite=overwrite, loaded=loaded)
    else:
        say(f"[bold]1/2[/] {ts_dir} is complete; reusing it")
    say("[bold]2/2[/] report")
    paths = write_comparison([ts_dir], out / "report")
    return paths.get("html", out / "report" / "report.html")
