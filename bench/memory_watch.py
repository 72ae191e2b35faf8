#!/usr/bin/env python
"""Run a command and sample the memory of every process it starts: RSS, PSS, file-backed against anonymous.

    python bench/memory_watch.py --json out.json -- python bench/bench_train.py --no-trl --processes 2 ...
    python bench/memory_watch.py --every 1 -- llmcal calibrate --method cft --processes 2 ...

Every ``--every`` seconds it walks the command's process tree and reads, for each process,
``/proc/PID/status`` (VmRSS, RssAnon, RssFile, RssShmem, VmHWM, Threads) and
``/proc/PID/smaps_rollup`` (Rss, Pss, Pss_Anon, Pss_File, Shared_Clean, Private_Dirty, ...).

Why PSS: a page that several processes map (the page cache of a memory-mapped weights file, the
shared libraries) counts in full in each one's RSS but once in the machine; PSS divides each page
by the number of processes mapping it, so the sum of the processes' PSS is what they take
together.  The largest sum of PSS over the run is what two training processes need from the
machine, the largest RSS of one process what ``/usr/bin/time -v`` reports.

Whenever a process's RSS passes its previous detailed snapshot by ``--detail-step`` MB, it also reads
``/proc/PID/smaps`` and sums Rss, Pss and Anonymous per kind of mapping (``weights`` for
``*.safetensors`` files, ``libraries`` for ``*.so``, ``other files``, ``[heap]``, glibc's main malloc
arena, and the anonymous rest: the arenas of other threads, whose heaps are mappings of at most
64 MiB that start 64 MiB-aligned, and the others: blocks above malloc's mmap threshold, which get a
mapping each, and thread stacks); the last snapshot is kept, so it is within ``--detail-step`` MB of
the process's largest RSS.  File names are reduced to their base names, so the JSON holds no path of
this machine.

The command's own output goes to this terminal; the exit status is the command's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

MB = 1024.0  # /proc reports kB
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")
ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Shared_Dirty",
               "Private_Clean", "Private_Dirty", "Anonymous")
ARENA_KB = 64 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: every non-main arena is a 64 MiB mapping


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _kv(text: str, keys) -> dict:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            value = int(rest.split()[0])
            out[key] = value if key == "Threads" else value / MB  # MB
    return out


def process_memory(pid: int) -> dict | None:
    """status and smaps_rollup of one process in MB (Threads a count); None once it is gone."""
    status, rollup = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/smaps_rollup")
    if status is None or rollup is None:
        return None
    return {**_kv(status, STATUS_KEYS), **_kv(rollup, ROLLUP_KEYS)}


def _kind(name: str, start: int, size_kb: int) -> str:
    if name.endswith(".safetensors"):
        return "weights"
    if re.search(r"\.so(\.\d+)*$", name):
        return "libraries"
    if name == "[heap]":
        return "heap (main arena)"
    if name.startswith("["):
        return name  # [stack], [vdso], ...
    if name:
        return "other files"
    if start % (ARENA_KB * 1024) == 0 and size_kb <= ARENA_KB:
        return "anonymous, malloc arenas of other threads"  # their heaps start 64 MiB-aligned
    return "anonymous, other (blocks above the mmap threshold, thread stacks)"


def mapping_breakdown(pid: int) -> dict | None:
    """Rss, Pss and Anonymous (MB) summed per kind of mapping, from /proc/PID/smaps; None once it is gone."""
    text = _read(f"/proc/{pid}/smaps")
    if text is None:
        return None
    out: dict[str, dict] = {}
    files: dict[str, dict] = {}
    current = per_file = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            start, end = (int(x, 16) for x in head[0].split("-"))
            name = head[5].strip() if len(head) > 5 else ""
            kind = _kind(name, start, (end - start) // 1024)
            current = out.setdefault(kind, {"mappings": 0, "Rss": 0.0, "Pss": 0.0, "Anonymous": 0.0})
            current["mappings"] += 1
            per_file = files.setdefault(Path(name).name, {"Rss": 0.0, "Pss": 0.0}) if kind == "weights" else None
            continue
        key, _, rest = line.partition(":")
        if current is not None and key in ("Rss", "Pss", "Anonymous"):
            value = int(rest.split()[0]) / MB
            current[key] += value
            if per_file is not None and key != "Anonymous":
                per_file[key] += value
    return {"kinds": out, "weight_files": files}


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        text = _read(f"/proc/{pid}/task/{task}/children")
        if text:
            out += [int(x) for x in text.split()]
    return out


def process_tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def _cmdline(pid: int) -> str:
    text = _read(f"/proc/{pid}/cmdline") or ""
    args = [a for a in text.split("\0") if a]
    # base names only: no path of this machine in the record
    return " ".join(Path(a).name if "/" in a else a for a in args)[:200]


class Watch:
    """Samples a process tree in a thread; ``record()`` is the JSON-ready result."""

    def __init__(self, root: int, every: float, detail_step_mb: float):
        self.root, self.every, self.detail_step = root, every, detail_step_mb
        self.t0 = time.monotonic()
        self.samples: list[dict] = []
        self.procs: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        t = round(time.monotonic() - self.t0, 2)
        row = {"t": t, "procs": {}}
        for pid in process_tree(self.root):
            mem = process_memory(pid)
            if mem is None:
                continue
            row["procs"][pid] = mem
            p = self.procs.setdefault(pid, {"cmd": _cmdline(pid), "first_t": t, "peak": {}, "detail": None,
                                            "detail_rss": 0.0})
            p["last_t"] = t
            for k, v in mem.items():
                if v > p["peak"].get(k, -1):
                    p["peak"][k] = v
            if mem["VmRSS"] >= p["detail_rss"] + self.detail_step:
                detail = mapping_breakdown(pid)
                if detail is not None:
                    p["detail"] = {"t": t, "VmRSS": mem["VmRSS"], "Pss": mem["Pss"], **detail}
                    p["detail_rss"] = mem["VmRSS"]
        row["sum"] = {k: sum(m.get(k, 0.0) for m in row["procs"].values())
                      for k in ("VmRSS", "Pss", "Pss_Anon", "Pss_File", "RssAnon", "RssFile")}
        self.samples.append(row)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def record(self) -> dict:
        def largest(key):
            row = max(self.samples, key=lambda r: r["sum"][key], default=None)
            return None if row is None else {"t": row["t"], **{k: round(v, 1) for k, v in row["sum"].items()},
                                             "per_process": {str(pid): {k: round(m[k], 1) for k in
                                                                        ("VmRSS", "Pss", "RssAnon", "RssFile")}
                                                             for pid, m in row["procs"].items()}}

        procs = {str(pid): {**{k: v for k, v in p.items() if k != "detail_rss"},
                            "peak": {k: round(v, 1) for k, v in p["peak"].items()}}
                 for pid, p in self.procs.items()}
        series = [{"t": r["t"], **{str(pid): {k: round(m[k], 1) for k in ("VmRSS", "Pss", "RssAnon", "RssFile",
                                                                          "Pss_File", "Private_Dirty")}
                                   for pid, m in r["procs"].items()}} for r in self.samples]
        return {"every_s": self.every, "samples": len(self.samples), "largest_sum_pss_mb": largest("Pss"),
                "largest_sum_rss_mb": largest("VmRSS"), "processes": procs, "series": series}


def summary(rec: dict) -> str:
    lines = []
    for pid, p in rec["processes"].items():
        pk = p["peak"]
        if pk.get("VmRSS", 0) < 200:
            continue
        lines.append(f"pid {pid} ({p['cmd'][:70]}): peak RSS {pk['VmRSS']:.0f} MB (anon {pk['RssAnon']:.0f}, "
                     f"file {pk['RssFile']:.0f}), peak PSS {pk['Pss']:.0f} MB (anon {pk['Pss_Anon']:.0f}, "
                     f"file {pk['Pss_File']:.0f}), Private_Dirty {pk['Private_Dirty']:.0f}, "
                     f"Shared_Clean {pk['Shared_Clean']:.0f}, threads {pk['Threads']}")
        d = p.get("detail")
        if d:
            parts = ", ".join(f"{k} {v['Rss']:.0f}/{v['Pss']:.0f}" for k, v in
                              sorted(d["kinds"].items(), key=lambda kv: -kv[1]["Rss"]) if v["Rss"] >= 10)
            lines.append(f"    at RSS {d['VmRSS']:.0f} MB (t={d['t']} s), Rss/Pss MB by mapping: {parts}")
    for key, what in (("largest_sum_rss_mb", "RSS"), ("largest_sum_pss_mb", "PSS")):
        s = rec[key]
        if s:
            lines.append(f"largest sum of {what} over the processes: RSS {s['VmRSS']:.0f} MB, PSS {s['Pss']:.0f} MB "
                         f"(PSS anon {s['Pss_Anon']:.0f}, file {s['Pss_File']:.0f}) at t={s['t']} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--detail-step", type=float, default=256.0, metavar="MB",
                    help="read a process's full smaps again when its RSS grew by this much since the last time")
    ap.add_argument("--json", help="write the samples, the per-process peaks and the snapshots here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    proc = subprocess.Popen(command)
    watch = Watch(proc.pid, args.every, args.detail_step)
    code = proc.wait()
    watch.stop()
    rec = {"command": " ".join(Path(a).name if os.path.isabs(a) else a for a in command), "exit_code": code,
           **watch.record()}
    print("\n" + summary(rec), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
