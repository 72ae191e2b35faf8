"""The one report engine: a report is a list of blocks, rendered by two jinja2 templates.

Run reports (``runreport.write_run_report``), comparisons (``runreport.write_comparison``), post-hoc
comparisons (``posthocreport.write_posthoc_report``) and study reports (``llmcal.study.report.write_report``) build a :class:`Document` (headings, paragraphs, lists, tables,
figures, Markdown sections, the verdict box) and write ``doc.markdown()`` as ``report.md`` and
``doc.html()`` as ``report.html``.  The templates are ``report.md.j2`` and ``report.html.j2`` (in
``llmcal/study/templates/``, the package data).  Text is Markdown (``**bold**``, ``*italic*``, `` `code` ``,
backslash escapes from ``tables.md_text``); the HTML template renders it with markdown-it (raw HTML off, so
data is shown, never interpreted).  Tables share one formatting: numbers to ``tables.SIG`` significant
digits, identity columns named once per run of equal values (``group``).  The HTML page is one file: the
style inline, every image a ``data:`` URI.
"""
from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Sequence

from .tables import SIG, html_table, markdown_table


@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("llmcal.study", "templates"),
                             autoescape=jinja2.select_autoescape(["html.j2"], default=False),
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["inline"] = _inline_html
    env.filters["markdown"] = _block_html
    env.filters["md_url"] = md_url
    env.globals.update(md_table=markdown_table, html_table=html_table)
    return env


@functools.lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline_html(text: str):
    """One line of Markdown as HTML (no paragraph around it)."""
    from markupsafe import Markup

    return Markup(_md().renderInline(str(text)))


def _block_html(text: str):
    """Markdown (paragraphs, lists, tables, code) as HTML."""
    from markupsafe import Markup

    return Markup(_md().render(str(text)))


def md_url(p: str) -> str:
    """A relative path as a Markdown link target (spaces and parentheses escaped)."""
    return str(p).replace(" ", "%20").replace("(", "%28").replace(")", "%29")


class Document:
    """A report as blocks; ``markdown()`` and ``html()`` render them.  Image sources are relative to ``root``."""

    def __init__(self, root: str | Path, title: str):
        self.root = Path(root)
        self.title = title
        self.blocks: list[dict] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append({"kind": "h", "level": level, "text": text})

    def p(self, text: str) -> None:
        self.blocks.append({"kind": "p", "text": text})

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append({"kind": "ul", "items": list(items)})

    def table(self, rows: list[dict], columns: list, *, group: Sequence[str] = (), sig: int | None = SIG) -> None:
        """A table of ``rows`` (``tables.markdown_table``'s columns); ``group``: keys named once per run."""
        if rows:
            self.blocks.append({"kind": "table", "rows": rows, "columns": columns, "group": list(group),
                                "sig": sig})

    def img(self, src: str, alt: str, caption: str = "") -> None:
        self.blocks.append({"kind": "img", "src": src, "alt": alt, "caption": caption})

    def figures(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Images side by side: ``(src, alt, caption)`` each."""
        if items:
            self.blocks.append({"kind": "figures", "items": [{"src": s, "alt": a, "caption": c} for s, a, c in items]})

    def markdown_section(self, text: str) -> None:
        """A section body written in Markdown by another module (``pipeline.Run.section``)."""
        if text.strip():
            self.blocks.append({"kind": "md", "text": text.strip("\n")})

    def verdict(self, title: str, lines: Sequence[str], *, note: str = "",
                side: Sequence[tuple[str, str, str]] = (), inner: Sequence[tuple[str, str, str]] = ()) -> None:
        """The box a report opens with: ``lines`` (Markdown) and a ``note``, the ``inner`` figures under them in
        the box, the ``side`` figures beside it (``(src, alt, caption)`` each)."""
        def figs(items):
            return [{"src": s, "alt": a, "caption": c} for s, a, c in items]

        self.blocks.append({"kind": "verdict", "title": title, "lines": list(lines), "note": note,
                            "side": figs(side), "inner": figs(inner)})

    def markdown(self) -> str:
        return _env().get_template("report.md.j2").render(blocks=self.blocks)

    def html(self) -> str:
        def embed(src: str) -> str | None:
            """The image as base64, or None when the file is not there (the page says so instead)."""
            path = self.root / src
            if not path.is_file():
                return None
            return base64.b64encode(path.read_bytes()).decode("ascii")

        return _env().get_template("report.html.j2").render(blocks=self.blocks, title=self.title, embed=embed)
