"""Reading YAML that llmcal trusts: safe types only, and no duplicate keys.

``yaml.safe_load`` keeps the last of two equal keys in a mapping without a
word, so a study file with two ``models:`` blocks, or a ``calibrate --config``
with ``lr`` twice, silently runs something other than what was written.  Every
YAML file llmcal reads goes through :func:`load_yaml`, which refuses that,
naming the file, the key and the lines of both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import LlmcalError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises on a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not keys written twice
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str | Path) -> Any:
    """The YAML document ``text`` (read from ``where``); LlmcalError for invalid YAML or a duplicate key."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise LlmcalError(f"{where} line {e.second}: duplicate key {e.key!r} (also at line {e.first}); YAML "
                          f"would keep only the last one: remove or merge one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise LlmcalError(f"{where}: not valid YAML{line} ({getattr(e, 'problem', None) or e})") from None
