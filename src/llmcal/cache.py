"""The scoring cache: an unchanged model scored on the same questions is scored once.

Scoring the original model is the most repeated work of a study: every
fine-tuning cell scores it on every evaluation set before training, the ``none``
and ``ts`` cells score it again, and a later run on the same data does it all
once more.  ``ScoreCache`` keeps each finished scoring pass on disk, under
``<llmcal cache>/scores/`` (``LLMCAL_CACHE`` moves the llmcal cache), and hands
it back to any later pass with the same key.

The key is a sha256 of everything that decides the numbers:

- the model: its spec (kind, path, GGUF file, adapter base) and a fingerprint of
  its weight files (name, size, modification time of every file in the model's
  directory or of the file itself, and of an adapter's base likewise), so
  replaced weights never hit an old entry;
- the backend, dtype and device type the model runs with;
- the template and every encoded question: id, subject, answer, prompt token
  ids and option token ids, in order (the data, subject filter, split, limit and
  seed all act through these);
- the token budget per batch (it decides which questions share a padded batch)
  and ``ENGINE_VERSION``, bumped whenever the scoring engine's arithmetic changes.

An entry is a predictions JSONL file and a manifest holding its sha256, line
count and the sha256 of its ids.  Reading checks all three; an entry that fails
a check is reported, deleted and recomputed, never trusted.  Writes go through
the atomic writer, manifest last, so a killed writer leaves no entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_write_json, atomic_write_text, dumps
from .predictions import Prediction

log = logging.getLogger(__name__)

# Bump when scoring.py / attention.py change what they compute (not how fast).
ENGINE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")


def default_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "scores"


def weights_fingerprint(spec: Any) -> list:
    """(name, size, mtime_ns) of the model's weight and config files, and of its base's for an adapter."""
    out: list = []
    path = Path(spec.path)
    if spec.kind in ("local", "gguf", "lora") and path.exists():
        files = [path / spec.gguf_file] if spec.kind == "gguf" and spec.gguf_file else (
            sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
            if path.is_dir() else [path])
        for f in files:
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    elif spec.kind == "hub":
        out.append(["hub", spec.path, _hub_revision(spec.path)])
    if getattr(spec, "base", None) is not None:
        out.append(["base", weights_fingerprint(spec.base)])
    return out


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot transformers would load offline (None when not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - any failure means "unknown revision": the key still changes with it
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


def score_key(loaded: Any, encoded: Sequence[Any], template: str, batch_tokens: int) -> str:
    """The cache key of scoring ``encoded`` with ``loaded`` (see the module docstring)."""
    spec = loaded.spec
    head = {
        "engine": ENGINE_VERSION,
        "spec": spec.to_dict(),
        "weights": weights_fingerprint(spec),
        "backend": loaded.backend,
        "dtype": str(loaded.dtype),
        "device": str(loaded.device).split(":")[0],
        "template": template,
        "batch_tokens": int(batch_tokens),
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode("utf-8"))
    for e in encoded:
        q = e.question
        h.update(json.dumps([q.id, q.subject, q.answer, list(e.input_ids), list(e.letter_ids)]).encode("utf-8"))
    return h.hexdigest()


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


class ScoreCache:
    """Finished scoring passes on disk, looked up by :func:`score_key`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.jsonl", d / f"{key}.json"

    def get(self, key: str, ids: Sequence[str]) -> list[Prediction] | None:
        """The cached predictions in the order of ``ids``; None when absent or damaged (then it is removed)."""
        data, manifest = self._paths(key)
        if not manifest.exists():
            return None
        try:
            man = json.loads(manifest.read_text(encoding="utf-8"))
            raw = data.read_bytes()
            if hashlib.sha256(raw).hexdigest() != man["sha256"]:
                raise ValueError("checksum mismatch")
            preds = [Prediction.from_dict(json.loads(line)) for line in raw.decode("utf-8").splitlines()]
            if len(preds) != man["n"] or _ids_digest([p.id for p in preds]) != man["ids"]:
                raise ValueError("line count or ids differ from the manifest")
            if [p.id for p in preds] != list(ids):
                raise ValueError("ids differ from the questions asked for")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("scoring cache entry %s is damaged (%s); recomputing it", data, e)
            self.drop(key)
            return None
        return preds

    def put(self, key: str, preds: Sequence[Prediction]) -> None:
        data, manifest = self._paths(key)
        text = "".join(dumps(p.to_dict()) + "\n" for p in preds)
        atomic_write_text(data, text)
        atomic_write_json(manifest, {"n": len(preds), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                                     "ids": _ids_digest([p.id for p in preds]), "engine": ENGINE_VERSION})

    def drop(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)
