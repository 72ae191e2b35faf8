"""llmcal.io: atomic writers, the JSONL appender and the tolerant reader of our own JSONL."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import llmcal.io as io
from llmcal.errors import LlmcalError


def _leftovers(directory: Path, name: str) -> list[str]:
    """Temporary files atomic_write_bytes would leave beside `name` (".name.XXXX.tmp")."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_writes_exact_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    data = bytes(range(256)) * 3
    assert io.atomic_write_bytes(target, data) == target
    assert target.read_bytes() == data
    assert _leftovers(target.parent, "f.bin") == []


def test_atomic_write_replaces_existing_file(tmp_path):
    target = tmp_path / "f.txt"
    io.atomic_write_text(target, "first, and longer than the second\n")
    io.atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    io.atomic_write_text(target, "old\n")
    with pytest.raises(TypeError):
        io.atomic_write_bytes(target, "not bytes")  # fails inside the write, after the temp file exists
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, "f.txt") == []


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    io.atomic_write_json(target, {"v": 1})

    def no_replace(src, dst):
        assert Path(src).exists()  # the full temp file is there just before the rename
        raise OSError("disk gone")

    monkeypatch.setattr(io.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk gone"):
        io.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path, "f.json") == []


def test_interrupt_during_write_leaves_no_file(tmp_path, monkeypatch):
    """KeyboardInterrupt (BaseException) also cleans up, and a new target is never created."""
    target = tmp_path / "new.jsonl"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_jsonl(target, [{"a": 1}, {"a": 2}])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "m.json"
    io.atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        io.atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_atomic_write_jsonl_one_record_per_line(tmp_path):
    target = tmp_path / "r.jsonl"
    io.atomic_write_jsonl(target, ({"i": i} for i in range(3)))
    assert target.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    io.atomic_write_jsonl(target, [])
    assert target.read_text() == ""


def test_atomic_write_json_is_indented_with_trailing_newline(tmp_path):
    target = tmp_path / "c.json"
    io.atomic_write_json(target, {"a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'


def test_atomic_savefig_writes_png_and_cleans_up_on_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    target = tmp_path / "plot.png"
    io.atomic_savefig(fig, target, dpi=20)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:
        def savefig(self, *a, **k):
            raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        io.atomic_savefig(Broken(), tmp_path / "other.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    plt.close(fig)


# --- dumps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Point:
    x: int
    y: str


def test_dumps_converts_numpy_paths_and_dataclasses():
    obj = {"arr": np.array([[1, 2], [3, 4]]), "f": np.float32(0.5), "i": np.int64(7),
           "p": Path("runs") / "x", "d": _Point(1, "é")}
    assert json.loads(io.dumps(obj)) == {"arr": [[1, 2], [3, 4]], "f": 0.5, "i": 7,
                                         "p": str(Path("runs") / "x"), "d": {"x": 1, "y": "é"}}
    assert "é" in io.dumps({"s": "é"})  # not escaped to \u00e9: files stay readable
    assert type(json.loads(io.dumps(np.int64(3)))) is int


def test_dumps_keeps_nan_and_rejects_unknown_types():
    back = json.loads(io.dumps({"v": float("nan")}))
    assert math.isnan(back["v"])
    with pytest.raises(TypeError, match="set"):
        io.dumps({1, 2})


# --- JSONL appender and tolerant reader --------------------------------------------------------


def test_appender_flushes_each_record_and_appends_across_opens(tmp_path):
    path = tmp_path / "sub" / "p.jsonl"
    with io.JsonlAppender(path) as app:
        app.write({"i": 0})
        # flushed: a reader (or a crash right now) sees the full line before close
        assert path.read_text() == '{"i": 0}\n'
        app.write({"i": 1, "arr": np.array([1.5])})
    with io.JsonlAppender(path) as app:
        app.write({"i": 2})
    assert list(io.read_jsonl_tolerant(path)) == [{"i": 0}, {"i": 1, "arr": [1.5]}, {"i": 2}]


def test_appender_closes_file(tmp_path):
    app = io.JsonlAppender(tmp_path / "p.jsonl")
    app.close()
    with pytest.raises(ValueError):
        app.write({"i": 0})


def test_reader_drops_torn_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    with io.JsonlAppender(path) as app:
        for i in range(3):
            app.write({"id": f"q{i}", "probs": [0.25, 0.75]})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "q3", "pro')  # the process died mid-line
    assert [r["id"] for r in io.read_jsonl_tolerant(path)] == ["q0", "q1", "q2"]


def test_reader_raises_on_corrupt_line_that_is_not_last(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"i": 0}\n{"i": \n{"i": 2}\n')
    it = io.read_jsonl_tolerant(path, hint="pass --overwrite")
    assert next(it) == {"i": 0}
    with pytest.raises(LlmcalError, match=r"p\.jsonl line 2: not a JSON record \(.*\); pass --overwrite"):
        next(it)
    path.write_bytes(b'{"i": 0}\n\xff\xfe\n{"i": 2}\n')  # bytes that are not UTF-8
    with pytest.raises(LlmcalError, match=r"p\.jsonl line 2: not a JSON record \(not UTF-8\)"):
        list(io.read_jsonl_tolerant(path))


def test_reader_skips_blank_lines_and_missing_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"i": 0}\n   \n{"i": 1}\n\n')
    assert list(io.read_jsonl_tolerant(path)) == [{"i": 0}, {"i": 1}]
    assert list(io.read_jsonl_tolerant(tmp_path / "absent.jsonl")) == []
