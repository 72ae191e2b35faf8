"""docs/: the CLI reference is generated from the app and current; links stay inside the repository."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_current(tmp_path):
    import typer

    fresh = tmp_path / "cli.md"
    _gen_cli().main(["--out", str(fresh)])
    committed = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert fresh.read_text(encoding="utf-8") == committed, (
        "docs/cli.md is stale: the CLI changed (or typer's Markdown generator did; installed "
        f"typer {typer.__version__}). Run `python docs/gen_cli.py` and commit docs/cli.md."
    )


def test_cli_reference_covers_every_command():
    import typer.main

    from llmcal.cli import app

    text = (DOCS / "cli.md").read_text(encoding="utf-8")

    def walk(cmd, prefix):
        yield prefix
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{prefix} {name}")

    names = list(walk(typer.main.get_command(app), "llmcal"))
    assert len(names) > 5
    for name in names[1:]:
        assert f"`{name}`" in text, name


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: str) -> set[str]:
    ids = set(re.findall(r'<a id="([^"]+)"', md))
    seen: dict[str, int] = {}
    for h in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", md, flags=re.S), flags=re.M):
        s = _slug(h)
        ids.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return ids


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_docs_links_resolve_inside_the_repository():
    pages = _pages()
    assert {"index.md", "reference.md", "cli.md"} <= {p.name for p in pages}
    problems = []
    for page in pages:
        md = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", md, flags=re.S)):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: outside links are allowed
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{page.name}: {target} points outside the repository")
            elif not dest.exists():
                problems.append(f"{page.name}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{page.name}: {target} names no anchor in {dest.name}")
    assert not problems, "\n".join(problems)


# Spelled in two parts so that this file itself does not contain the strings it looks for.
@pytest.mark.parametrize("needle", ["DESIGN" + ".md", "shared" + " folder", "/work/", "/home/", "/Users/"])
def test_docs_do_not_point_outside_the_repository(needle):
    hits = [p.name for p in _pages() + [DOCS / "gen_cli.py"] if needle.lower() in p.read_text(encoding="utf-8").lower()]
    assert not hits, f"{needle!r} in docs/{hits}"
