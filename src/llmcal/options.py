"""One source of configuration: the run config dataclasses are the CLI flags, the YAML keys and the Python API.

Each field of ``EvalConfig``, ``RegimeConfig`` and ``FinetuneConfig`` is
declared with :func:`option` (or one of the ``shared`` options every command
has): its help text, its flag (``--`` + the field name with dashes unless the
field says otherwise) and how the command line spells its value.  From that:

- the typer commands build their options from the fields (``cli_parameters``),
  so a flag exists exactly when its field does and every flag has help;
- error messages name flags through ``flag_of``, so they name flags that exist
  (a test checks every ``--flag`` written in the source);
- YAML files (``calibrate --config``, study options) are validated against the
  same fields by pydantic (``from_mapping``): an unknown key or a wrong type is
  an error naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from .errors import LlmcalError


def option(default: Any = MISSING, *, help: str, flag: str | None = None, short: str | None = None,
           cli: bool = True, parse: Callable[[Any], Any] | None = None, cli_type: Any = None,
           default_factory: Any = MISSING) -> Any:
    """A config field with its help text and command-line spelling.

    ``flag``: the long flag when it is not ``--field-name``; ``short``: e.g. "-m";
    ``cli=False``: not a flag (set by the library or a study); ``cli_type`` and
    ``parse``: the flag's type and the conversion to the field's value when they
    differ (a mapping given as JSON text, a list given as comma-separated text).
    """
    md = {"help": help, "flag": flag, "short": short, "cli": cli, "parse": parse, "cli_type": cli_type}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


def parse_mapping(text: Any) -> dict | None:
    """``--mapping``: JSON, or ``field=column`` pairs; ``choices=A|B|C|D`` spreads options over columns."""
    if text is None or isinstance(text, dict):
        return text
    if not text:
        return None
    try:
        m = json.loads(text)
    except json.JSONDecodeError:
        m = {}
        for part in str(text).split(","):
            if "=" not in part:
                raise LlmcalError(f"--mapping {text!r}: expected JSON or field=column pairs")
            k, v = part.split("=", 1)
            v = v.strip()
            m[k.strip()] = [c.strip() for c in v.split("|")] if "|" in v else v
    if not isinstance(m, dict):
        raise LlmcalError(f"--mapping {text!r}: expected an object")
    return m


def parse_modules(text: Any) -> str | list[str]:
    """``--target-modules``: ``all-linear`` or comma-separated module names."""
    if isinstance(text, (list, tuple)):
        return list(text)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def parse_every(text: Any) -> str | int:
    """``--estep-every``: ``epoch`` or a whole number of steps."""
    s = str(text).strip()
    return int(s) if s.isdigit() else s


# ---- options every command shares (one help text, one meaning) ----------------------------
def shared(name: str, default: Any = MISSING) -> Any:
    spec = SHARED[name]
    kw = dict(spec)
    if default is not MISSING:
        kw.pop("default", None)
        kw.pop("default_factory", None)
        kw["default"] = default
    return option(**kw)


SHARED: dict[str, dict] = {
    "model": dict(help="Hub id, local directory, .gguf file, LoRA adapter directory, or an alias "
                       "(smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-1.5b-instruct).", short="-m"),
    "gguf_file": dict(default=None, help="GGUF file name inside --model's directory or hub repository."),
    "base": dict(default=None, help="Base model of a LoRA adapter given as --model (default: the one it records)."),
    "seed": dict(default=0, help="Seed of every split, subset and sampler (a question's split depends only on "
                                 "its id and the seed)."),
    "template": dict(default="auto", help="Prompt template: plain (lm-eval's zero-shot MMLU format), chat (the "
                                          "tokenizer's chat template) or auto (chat when the tokenizer has one)."),
    "dtype": dict(default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."),
    "device": dict(default="auto", help="auto, cpu, cuda, cuda:1, ..."),
    "batch_tokens": dict(default=2048, help="Token budget of a scoring batch (batch size x longest prompt)."),
    "n_bins": dict(default=10, help="Confidence bins of ECE, the reliability diagram and RCFT's ECE term."),
    "n_bootstrap": dict(default=1000, help="Bootstrap resamples of the 95% intervals."),
    "mapping": dict(default=None, help='Column mapping of a data file: JSON, or "question=q,choices=A|B|C|D,'
                                       'answer=label".', parse=parse_mapping, cli_type=Optional[str]),
}


# ---- reading the fields --------------------------------------------------------------------
def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flag_of(cls: type, name: str) -> str:
    """The long flag of field ``name`` of ``cls``."""
    f = fields_of(cls).get(name)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def cli_flags(*classes: type) -> set[str]:
    return {flag_of(c, f.name) for c in classes for f in dataclasses.fields(c) if f.metadata.get("cli", True)}


def _cli_annotation(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """(typer annotation, typer default) of a field."""
    md = f.metadata
    default = None if f.default is MISSING and f.default_factory is MISSING else (
        f.default if f.default is not MISSING else f.default_factory())
    if md.get("cli_type") is not None:
        return md["cli_type"], default
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            hint = inner[0]
            origin, args = typing.get_origin(hint), typing.get_args(hint)
            if origin is list:
                return List[args[0]], []
            return Optional[hint], default
    if origin is list:
        return List[args[0]], list(default or [])
    return hint, default


def cli_parameters(*classes: type, exclude: set[str] = frozenset(), required: set[str] = frozenset(),
                   optional: set[str] = frozenset()) -> list[inspect.Parameter]:
    """typer parameters for the CLI fields of ``classes`` (the first class wins a shared name).

    ``required``: fields that must be given; ``optional``: fields whose default is
    shown as unset (they matter for one method only, and giving them for another is
    an error the command reports).
    """
    import typer

    seen: set[str] = set()
    params = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in exclude or not f.metadata.get("cli", True):
                continue
            seen.add(f.name)
            annotation, default = _cli_annotation(f, hints[f.name])
            names = [flag_of(cls, f.name)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            if annotation is bool:
                names = [f"{names[0]}/--no-{names[0][2:]}"]
            if f.name in required:
                default = ...
            elif f.name in optional and annotation is not bool and typing.get_origin(annotation) is not list:
                annotation = Optional[annotation] if typing.get_origin(annotation) is not typing.Union else annotation
            opt = typer.Option(default, *names, help=f.metadata["help"], show_default=default not in (None, ...))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                            annotation=annotation))
    return params


def command(params: list[inspect.Parameter], impl: Callable[..., Any]) -> Callable[..., Any]:
    """A function typer can register: keyword parameters ``params`` (+ the click context as ``ctx``)."""
    import typer

    def cmd(**kwargs: Any) -> Any:
        return impl(**kwargs)

    ctx = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    cmd.__signature__ = inspect.Signature([ctx, *params])  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in [ctx, *params]}
    cmd.__doc__ = impl.__doc__
    cmd.__name__ = impl.__name__
    return cmd


def given(ctx: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The values the user typed on the command line (not defaults)."""
    # By name: typer vendors its own click, whose ParameterSource enum is not click's.
    return {k: v for k, v in values.items() if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}


def to_field_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """CLI values -> field values of ``cls`` (parsed; empty repeatable options become the field's default)."""
    fields = fields_of(cls)
    out = {}
    for k, v in values.items():
        f = fields.get(k)
        if f is None:
            continue
        if v == [] and f.default is None:
            v = None
        parse = f.metadata.get("parse")
        out[k] = parse(v) if parse is not None and v is not None else v
    return out


# ---- YAML / mappings -----------------------------------------------------------------------
def from_mapping(cls: type, data: dict, where: str, *, extra: dict[str, Any] | None = None) -> Any:
    """``cls(**data)`` validated by pydantic: unknown keys and wrong types are errors naming ``where`` and the key."""
    from pydantic import TypeAdapter, ValidationError

    values = {**data, **(extra or {})}
    for k, f in fields_of(cls).items():
        parse = f.metadata.get("parse")
        if k in values and parse is not None and isinstance(values[k], str):
            values[k] = parse(values[k])
    try:
        return TypeAdapter(cls).validate_python(values)  # the class's __pydantic_config__ forbids extra keys
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                problems.append(f"unknown key {key!r}")
            else:
                problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise LlmcalError(f"{where}: {'; '.join(problems)}") from None


def read_yaml_mapping(path: str | Path) -> dict:
    from .yamlio import load_yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise LlmcalError(f"{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LlmcalError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    doc = load_yaml(text, p)  # refuses a key given twice, naming both lines
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise LlmcalError(f"{p}: expected a mapping of option names to values at the top level")
    return doc
