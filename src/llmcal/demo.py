"""``llmcal demo``: the embedded default, end to end, offline.

Qwen2.5-Coder-1.5B-Instruct (instruction-tuned and aligned) on MMLU with the
plain template: uncalibrated, temperature scaling, CFT and RCFT side by side, as a small study
(``assets/demo.yaml``) so that every step is a normal, resumable run directory.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_CONFIG = "demo.yaml"


def demo_config_path() -> Path:
    return Path(str(resources.files("llmcal").joinpath("assets", DEMO_CONFIG)))


def run_demo(out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Run (or resume) the demo study into ``out``; returns the HTML report's path."""
    from .study import run_study

    paths = run_study(demo_config_path(), out, overwrite=overwrite, progress=progress)
    return paths["html"]
