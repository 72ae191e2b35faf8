"""One content-addressed store for every cache llmcal keeps, and the one fingerprint of model weights.

Three things are computed by a model pass that gives the same answer every
time it is asked the same question, and are kept on disk so that later runs
ask it once:

- ``scores/``: a finished scoring pass of the unchanged model (every fine-tuning
  cell, the ``none`` and ``ts`` cells and any later run score it on the same
  questions; :class:`ScoreCache`, keys by :func:`score_key`);
- ``drift/``: the original model's greedy responses of the alignment-drift
  measurement (``llmcal.drift``);
- ``priors/``: contextual calibration's content-free letter priors
  (``llmcal.posthoc.label_free.content_free_distribution``).

Each is a namespace of one :class:`Store` under the llmcal cache
(``<llmcal cache>/<namespace>/``, ``LLMCAL_CACHE`` moves it).  A key is the
sha256 of a canonical JSON document (sorted keys, no whitespace) holding
everything that decides the cached value, the namespace and ``STORE_VERSION``
included; what goes into each document is described where it is built.  The
model part of every document is :func:`weights_fingerprint`.

An entry is one JSONL file, ``<namespace>/<key[:2]>/<key>.jsonl``: a header line
(store version, namespace, key, record count and the sha256 of the record
lines), then one JSON record per line.  It is written in one piece by the atomic
writer, so a killed writer leaves no entry.  Reading checks the header, the
count and the checksum, and the namespace's owner checks the records mean what
was asked for (the ids of the questions, the token ranges); an entry that fails
a check is reported, deleted and recomputed, never trusted.

``LLMCAL_SCORE_CACHE=0`` turns the ``scores`` namespace off (:func:`enabled`);
the drift measurement and the priors take a ``cache`` argument instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .io import atomic_write_bytes, dumps
from .predictions import Prediction

log = logging.getLogger(__name__)

# Bump when the entry layout or a key document changes meaning: old entries then are misses, never misread.
# v1 (before one store): scores as <key>.jsonl + <key>.json manifest, drift as drift/<key>.json.
STORE_VERSION = 2
# Bump when scoring.py / attention.py change what they compute (not how fast).
ENGINE_VERSION = 1
# The files of a model directory that decide its weights: weights, configs, sentencepiece models.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")
# The one switch per namespace that can be turned off from the environment (on unless "0", "false", ...).
SWITCHES = {"scores": "LLMCAL_SCORE_CACHE"}
# What an entry of each namespace holds, for the warnings.
WHAT = {"scores": "scoring cache", "drift": "drift response cache", "priors": "contextual prior cache"}


def namespace_dir(namespace: str) -> Path:
    """``<llmcal cache>/<namespace>``."""
    from .models import cache_dir

    return cache_dir() / namespace


def default_cache_dir() -> Path:
    """The ``scores`` namespace's folder (a function so tests can give each test its own)."""
    return namespace_dir("scores")


def enabled(namespace: str) -> bool:
    """Whether ``namespace`` is on: its switch in :data:`SWITCHES` is not "0", "false", "no" or "off"."""
    var = SWITCHES.get(namespace)
    return var is None or os.environ.get(var, "1").strip().lower() not in ("0", "false", "no", "off")


def canonical(doc: Any) -> bytes:
    """The canonical JSON bytes of a key document: sorted keys, no whitespace, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


# ---- the one fingerprint of model weights ---------------------------------------------------
def weights_fingerprint(spec: Any) -> dict | None:
    """What names a ``ModelSpec``'s weights as they are on disk now; None when they cannot be named.

    ``{"model": spec.identity, "files": [[name, size, mtime_ns], ...]}`` for a
    local directory (its files ending in :data:`WEIGHT_SUFFIXES`, sorted), a
    GGUF file (that file alone) or a LoRA adapter's directory;
    ``{"model": ..., "revision": commit}`` for a hub model (or a hub GGUF
    file), the commit of the snapshot in the local hub cache that a load would
    read; an adapter adds ``"base"``, its base's fingerprint, so an adapter on
    replaced base weights is a different model.  A kind of model llmcal does
    not know (an outside backend's, ``llmcal.backends``) is named by its spec,
    ``{"spec": spec.to_dict()}``: a backend that says ``cacheable`` says its
    spec names the weights.

    Why size and modification time rather than a hash of the contents: a
    content hash reads every byte of the weights on every run, including the
    runs whose scores all come from the cache and otherwise read no weight
    at all (``LoadedModel`` loads lazily); every way weights get replaced
    (``save_pretrained``, a download, a copy, a conversion) rewrites the file
    and so moves its modification time (nanoseconds) - the test make and rsync
    rely on.  The resolved path is part of it (``identity``), so a copy
    elsewhere is a miss, the safe side.  A hub snapshot's commit names its
    contents exactly, without reading them.  Only the weight-deciding files
    count: a README, a tokenizer's merges (the key holds the token ids) or a
    run's report written next to an adapter do not change the numbers.

    None - a hub model not in the local hub cache, a local path that is gone -
    means "unknown": the caller does not cache (it must not store an entry
    under a key that would match other weights later).
    """
    if spec.kind not in ("hub", "local", "gguf", "lora"):
        # a backend's own kind of model: its ``cacheable`` says its spec names the weights, so the spec is the name
        return {"spec": spec.to_dict()}
    fp: dict = {"model": spec.identity}
    path = Path(spec.path)
    if spec.kind == "hub" or (spec.kind == "gguf" and not path.exists()):
        revision = _hub_revision(spec.path, spec.gguf_file or "config.json")
        if revision is None:
            return None
        fp["revision"] = revision
    elif path.is_dir() or path.is_file():
        if spec.kind == "gguf" and spec.gguf_file:
            files = [path / spec.gguf_file]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        else:
            files = [path]
        try:
            fp["files"] = [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
        except OSError:
            return None  # a file named by the spec is missing: the load will say so
    else:
        return None
    if getattr(spec, "base", None) is not None:
        base = weights_fingerprint(spec.base)
        if base is None:
            return None
        fp["base"] = base
    return fp


def _hub_revision(repo_id: str, filename: str) -> str | None:
    """The commit of the cached snapshot holding ``filename`` that an offline load reads (None when not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an id that is no valid repo name is not cached either
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


# ---- the store --------------------------------------------------------------------------------
def store_key(namespace: str, doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``doc`` with the store version and the namespace added."""
    return hashlib.sha256(canonical({"store": STORE_VERSION, "namespace": namespace, **doc})).hexdigest()


class Store:
    """One namespace of the content-addressed store (see the module docstring).

    ``key(doc)`` names an entry; ``get(key)`` gives its records (None when
    absent or damaged), ``put(key, records)`` writes it, ``reject(key, why)``
    deletes an entry whose records turned out not to be what was asked for.
    """

    def __init__(self, namespace: str, root: str | Path | None = None):
        if namespace not in WHAT:
            raise ValueError(f"unknown cache namespace {namespace!r}")
        self.namespace = namespace
        self.root = Path(root) if root is not None else namespace_dir(namespace)

    def key(self, doc: Mapping[str, Any]) -> str:
        return store_key(self.namespace, doc)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.jsonl"

    def get(self, key: str) -> list | None:
        """The records stored under ``key``, checked against the header; None when absent or damaged."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.reject(key, f"{type(e).__name__}: {e}")
            return None
        try:
            head_line, _, body = raw.partition(b"\n")
            head = json.loads(head_line)
            if head.get("store") != STORE_VERSION or head.get("namespace") != self.namespace or head.get("key") != key:
                raise ValueError("the header names another store version, namespace or key")
            if hashlib.sha256(body).hexdigest() != head.get("sha256"):
                raise ValueError("checksum mismatch")
            records = [json.loads(line) for line in body.decode("utf-8").splitlines()]
            if len(records) != head.get("n"):
                raise ValueError(f"{len(records)} records, the header says {head.get('n')}")
        except (ValueError, TypeError, AttributeError) as e:  # JSON and UTF-8 errors are ValueErrors
            self.reject(key, str(e))
            return None
        return records

    def put(self, key: str, records: Sequence[Any]) -> Path:
        body = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
        head = {"store": STORE_VERSION, "namespace": self.namespace, "key": key, "n": len(records),
                "sha256": hashlib.sha256(body).hexdigest()}
        return atomic_write_bytes(self.path(key), dumps(head).encode("utf-8") + b"\n" + body)

    def reject(self, key: str, why: str) -> None:
        """Report the damaged entry under ``key`` and delete it, so it is recomputed."""
        log.warning("%s: damaged %s entry (%s); recomputing it", self.path(key), WHAT[self.namespace], why)
        self.drop(key)

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


# ---- the scores namespace ---------------------------------------------------------------------
def score_key_doc(loaded: Any, encoded: Sequence[Any], template: str, batch_tokens: int) -> dict | None:
    """What decides the scores of ``encoded`` with ``loaded``; None when the weights cannot be fingerprinted.

    The model's :func:`weights_fingerprint`; the backend, dtype and device type
    it runs with; the template and a sha256 over every encoded question (id,
    subject, answer, prompt token ids and option token ids, in order: the data,
    subject filter, split, limit, seed and tokenizer all act through these); the
    token budget per batch (it decides which questions share a padded batch)
    and ``ENGINE_VERSION``.  Nothing in it needs the weights in memory.
    """
    weights = weights_fingerprint(loaded.spec)
    if weights is None:
        return None
    questions = hashlib.sha256()
    for e in encoded:
        q = e.question
        questions.update(json.dumps([q.id, q.subject, q.answer, list(e.input_ids), list(e.letter_ids)]).encode())
    return {"engine": ENGINE_VERSION, "weights": weights, "backend": loaded.backend, "dtype": str(loaded.dtype),
            "device": str(loaded.device).split(":")[0], "template": template, "batch_tokens": int(batch_tokens),
            "questions": questions.hexdigest()}


def score_key(loaded: Any, encoded: Sequence[Any], template: str, batch_tokens: int) -> str | None:
    """The ``scores`` key of scoring ``encoded`` with ``loaded`` (:func:`score_key_doc`); None: do not cache."""
    doc = score_key_doc(loaded, encoded, template, batch_tokens)
    return None if doc is None else store_key("scores", doc)


class ScoreCache:
    """Finished scoring passes in the ``scores`` namespace, looked up by :func:`score_key`."""

    def __init__(self, root: str | Path | None = None):
        self.store = Store("scores", root if root is not None else default_cache_dir())
        self.root = self.store.root

    def get(self, key: str, ids: Sequence[str]) -> list[Prediction] | None:
        """The cached predictions, which must be for ``ids`` in that order; None when absent or damaged."""
        records = self.store.get(key)
        if records is None:
            return None
        try:
            preds = [Prediction.from_dict(r) for r in records]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.store.reject(key, f"not a prediction: {e!r}")
            return None
        if [p.id for p in preds] != list(ids):
            self.store.reject(key, "its ids differ from the questions asked for")
            return None
        return preds

    def put(self, key: str, preds: Sequence[Prediction]) -> None:
        self.store.put(key, [p.to_dict() for p in preds])

    def drop(self, key: str) -> None:
        self.store.drop(key)
