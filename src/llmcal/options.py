"""One source of configuration: the run config dataclasses are the CLI flags, the YAML keys and the Python API.

Each field of ``EvalConfig``, ``RegimeConfig`` and ``FinetuneConfig`` is
declared with :func:`option` (or one of the ``shared`` options every command
has): its help text, its flag (``--`` + the field name with dashes unless the
field says otherwise) and how the command line spells its value.  From that:

- the typer commands build their options from the fields (``cli_parameters``),
  so a flag exists exactly when its field does and every flag has help;
- error messages name flags through ``flag_of``, so they name flags that exist
  (a test checks every ``--flag`` written in the source);
- every config class is a frozen pydantic dataclass (:func:`config`): its field
  types (``Literal`` choices, the ranges of ``llmcal.validation``) are checked by
  pydantic when it is built, whether by the Python API, the CLI or a YAML file
  (``from_mapping``), and a bad value is an error naming the flag, or the file,
  key and line it came from.  Rules between fields stay in each config's one
  check function.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional

from .errors import LlmcalError

# The choices of the options more than one config has (the fields say ``template: Template``).
Template = Literal["auto", "plain", "chat"]
# resolve_dtype's names: the four of the help text and their short spellings
Dtype = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


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


# ---- the config classes ----------------------------------------------------------------------
def config(cls: type) -> type:
    """``cls`` as a frozen pydantic dataclass whose fields pydantic checks against their types on every
    construction (``EvalConfig(...)``, ``dataclasses.replace``); a bad value raises ``LlmcalError``
    naming the flag.  Unknown keyword arguments are errors too."""
    from pydantic import ConfigDict, ValidationError
    from pydantic.dataclasses import dataclass as pydantic_dataclass

    cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    build = cls.__init__

    @functools.wraps(build)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            build(self, *args, **kwargs)
        except ValidationError as e:
            raise LlmcalError(describe(cls, e)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def describe(cls: type, error: Any, *, where: str | None = None, lines: dict[str, int] | None = None,
             from_file: set[str] = frozenset()) -> str:
    """The message of a ``ValidationError`` of config ``cls``: each problem names the flag, or for a key in
    ``from_file`` the file ``where``, the key and its line (``lines``)."""
    from .validation import problems

    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for name, message in problems(error.errors(), lambda n: label_of(cls, n), hints):
        if name not in from_file:
            out.append(message)
            continue
        line = (lines or {}).get(name)
        if message.startswith("unknown key"):
            out.append(f"{where}: {message}" + (f" (line {line})" if line else ""))
        else:
            out.append(f"{where}: {name}" + (f" (line {line})" if line else "") + f": {message}")
    return "; ".join(out)


# ---- reading the fields --------------------------------------------------------------------
def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flag_of(cls: type, name: str) -> str:
    """The long flag of field ``name`` of ``cls``."""
    f = fields_of(cls).get(name)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def label_of(cls: type, name: str) -> str:
    """How a message names field ``name``: its flag, or its key when no flag sets it (``training_args``)."""
    f = fields_of(cls).get(name)
    if f is None or not (f.metadata.get("cli", True) or f.metadata.get("flag")):
        return name
    return flag_of(cls, name)


def cli_flags(*classes: type) -> set[str]:
    return {flag_of(c, f.name) for c in classes for f in dataclasses.fields(c) if f.metadata.get("cli", True)}


def _cli_annotation(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """(typer annotation, typer default) of a field."""
    md = f.metadata
    default = None if f.default is MISSING and f.default_factory is MISSING else (
        f.default if f.default is not MISSING else f.default_factory())
    if md.get("cli_type") is not None:
        return md["cli_type"], default
    hint = _cli_type(hint)
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


def _cli_type(hint: Any) -> Any:
    """The type typer reads a field's flag as: a ``Literal`` is read as its values' type (the config's check
    words the error, naming the choices), a constrained ``Annotated`` type as its base type, a number that may
    be an int or a float as a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _cli_type(args[0])
    if origin is Literal:
        return type(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [t for t in dict.fromkeys(_cli_type(a) for a in args) if t is not type(None)]
        one = inner[0] if len(inner) == 1 else float if set(inner) == {int, float} else str  # a number, or text
        return Optional[one] if type(None) in args else one
    if origin is list:
        return List[_cli_type(args[0])]
    return hint


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
def from_mapping(cls: type, data: dict, where: str | None = None, *, lines: dict[str, int] | None = None,
                 options: dict[str, Any] | None = None) -> Any:
    """``cls`` from the mapping ``data`` of file ``where`` and ``options`` given as flags or keyword arguments
    (which win), validated by pydantic: a problem with a key of the file names the file, the key and its
    line (``lines``), one with an option names its flag."""
    from pydantic import TypeAdapter, ValidationError

    values = {**data, **(options or {})}
    for k, f in fields_of(cls).items():
        parse = f.metadata.get("parse")
        if k in values and parse is not None and isinstance(values[k], str):
            values[k] = parse(values[k])
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        raise LlmcalError(describe(cls, e, where=where, lines=lines,
                                   from_file=set(data) - set(options or {}))) from None


def read_yaml_options(path: str | Path) -> tuple[dict, dict[str, int]]:
    """A YAML file of options: (the mapping, each top-level key's line)."""
    import yaml

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
        return {}, {}
    if not isinstance(doc, dict):
        raise LlmcalError(f"{p}: expected a mapping of option names to values at the top level")
    root = yaml.compose(text)
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    return doc, lines
