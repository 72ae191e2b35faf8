"""Credentials out of everything llmcal records or prints.

A served model's ``--base-url`` may carry a secret (``http://user:KEY@host/v1``,
``https://host/v1?api_key=KEY``).  The request needs it; nothing else does.  Every
recorded document goes through ``runs.portable``, which applies :func:`redact`, and
the CLI redacts its error messages and log lines, so the secret never reaches
config.json, metrics.json, report.md or the terminal (a study's study.json and its copy of the study YAML are written by the study runner, not through ``portable``).

What is replaced by ``***``: the whole user-info part of any ``scheme://...@`` URL
(the user name can be the secret, as in ``https://KEY@host``), and the value of a
query parameter whose name says it is a secret (``key``, ``api_key``, ``token``,
``access_token``, ``password``, ``secret``, ``sig``, ...).
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://userinfo@ : userinfo is everything up to the first @ before the host's end (no /, ?, # or space).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/?#@\s]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_\-]*(?:key|token|secret|password|passwd|pwd|sig|signature|auth)[A-Za-z0-9_\-]*))="
    r"(?P<value>[^&#\s'\"]*)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@" if m["info"] != MASK else m[0], text)
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: f"{m['name']}={MASK}" if m["value"] else m[0], text)
    return text


def redact(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings) with :func:`redact_text` applied to every string in it."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj
