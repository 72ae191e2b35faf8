"""The run's ``confidence`` block (metrics.json, top level) and its report section.

``{"source", "template", "n", "unparseable", "retries", "requests", "prompt_tokens", "completion_tokens",
"seconds", ...}``: ``n`` questions; ``unparseable`` questions recorded as unparseable (``record``: uniform,
flagged); ``retries`` parse retries; requests and tokens summed from the records' ``usage`` (tokens as the
server's ``usage`` reports them: a server that reports none adds 0); ``seconds`` the wall time of the
scoring pass in the process that finished the run, and ``questions_timed`` the questions that process
scored (fewer than ``n`` after a resume: the records hold no times, so that a resumed predictions file
equals an uninterrupted one; seconds per question is ``seconds / questions_timed``).  Also
``unparseable_samples`` (consistency), ``below_chance`` (verbalized, ptrue: stated confidences at or below 1/K)
and ``parse_rate`` (share of questions parsed).

For ``--confidence logprobs`` through ``--backend openai`` the same block is written from the client's
counters (``OpenAIClient.usage``) of this process's scoring requests: ``questions_costed`` (and
``questions_timed``) say how many questions those are (fewer than ``n`` after a resume).
"""
from __future__ import annotations

import time
from typing import Any, Sequence


def block_from_records(source: str, template: str | None, preds: Sequence[Any], seconds: float,
                       timed: int | None = None) -> dict:
    """The block of a verbalized, ptrue or consistency run, summed over its predictions' records."""
    n = len(preds)
    extras = [p.extra or {} for p in preds]
    bad = sum(1 for e in extras if (e.get("parse") or {}).get("status") == "unparseable")
    usage = [e.get("usage") or {} for e in extras]

    def total(key: str) -> Any:
        return sum(u.get(key, 0) for u in usage)

    block = {"source": source, "template": template, "n": n, "unparseable": bad,
             "retries": sum((e.get("parse") or {}).get("retries", 0) for e in extras),
             "requests": total("requests"), "prompt_tokens": total("prompt_tokens"),
             "completion_tokens": total("completion_tokens"), "seconds": round(seconds, 3),
             "questions_costed": n, "questions_timed": n if timed is None else timed,
             "parse_rate": (n - bad) / n if n else None}
    if source == "consistency":
        block["unparseable_samples"] = sum((e.get("parse") or {}).get("unparseable_samples", 0) for e in extras)
    else:
        block["below_chance"] = sum(1 for e in extras if e.get("below_chance"))
    return block


def block_from_counters(n: int, counters: dict, seconds: float, costed: int) -> dict:
    """The block of a logprobs run through a served model (one request per question, nothing to parse)."""
    return {"source": "logprobs", "template": None, "n": n, "unparseable": 0, "retries": 0,
            "requests": counters["requests"], "prompt_tokens": counters["prompt_tokens"],
            "completion_tokens": counters["completion_tokens"], "seconds": round(seconds, 3),
            "questions_costed": costed, "questions_timed": costed, "parse_rate": 1.0}


def section(block: dict) -> str:
    """The report's "Confidence source" section (Markdown, through the report engine's table)."""
    from ..report.tables import markdown_table

    row = {"source": block["source"] + (f" ({block['template']})" if block.get("template") else ""),
           "questions": block["n"], "unparseable": block["unparseable"], "parse retries": block["retries"]}
    for key in ("unparseable_samples", "below_chance"):
        if key in block:
            row[key.replace("_", " ")] = block[key]
    row.update({"requests": block["requests"], "prompt tokens": block["prompt_tokens"],
                "completion tokens": block["completion_tokens"], "seconds": round(block["seconds"], 1)})
    if block.get("questions_costed") != block["n"]:
        row["questions in the cost"] = "not known (resumed)" if block.get("questions_costed") is None \
            else block["questions_costed"]
    if block.get("questions_timed", block["n"]) != block["n"]:
        row["questions in the seconds"] = block["questions_timed"]
    return (markdown_table([row], list(row), sig=3) + "\n\nAn unparseable question has the uniform distribution and is flagged in "
            "predictions.jsonl, where every question keeps its raw replies and parse outcome (`responses`, `parse`); "
            "docs/reference.md, \"Confidence without logprobs\".\n")


class Counted:
    """The clock and the served client's counters when scoring starts; ``block`` once it has finished."""

    def __init__(self, loaded: Any):
        engine = (getattr(loaded, "extra", None) or {}).get("engine")
        self.client = getattr(engine, "client", None)
        self.before = self.client.usage() if hasattr(self.client, "usage") else None
        self.start = time.monotonic()

    def block(self, cfg: Any, preds: Sequence[Any], done_before: int = 0) -> dict | None:
        """The run's ``confidence`` block; None for a local model read from logprobs (nothing to count).
        ``done_before``: the questions earlier, killed attempts scored (``Run.scored_before``), which this
        process's clock and counters do not cover."""
        seconds = time.monotonic() - self.start
        source = getattr(cfg, "confidence", "logprobs")
        if source != "logprobs":
            block = block_from_records(source, cfg.verbalized_template if source == "verbalized" else None, preds,
                                       seconds, timed=len(preds) - done_before)
            if source == "consistency":
                block.update(samples=cfg.samples, sample_temperature=cfg.sample_temperature)
            if source != "verbalized" or cfg.verbalized_template == "2stage":
                block["reasoning"] = bool(cfg.reasoning)
            return block
        if self.before is None:
            return None
        after = self.client.usage()
        counters = {k: after[k] - self.before[k] for k in after}
        return block_from_counters(len(preds), counters, seconds, len(preds) - done_before)
