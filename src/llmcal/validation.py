"""One validation layer: constrained types that pydantic checks, and one wording of what it refuses.

The config dataclasses (``llmcal.options.config``) and the functions decorated with :func:`validated`
declare what a value may be in its type: ``Literal[...]`` for a choice, the named types below for a
range (``PositiveInt``, ``Fraction``, ...).  pydantic checks them; a ``ValidationError`` becomes one
``LlmcalError`` whose message names the flag or the parameter:

    --n-bins must be a positive integer (got 0)
    unknown --split 'validation': choose one of all, train, calib, test

Each named type says in words what it accepts (``says``), so the message reads the same wherever the
type is used.  Numbers: a bool is never a number (``True`` is not 1 bins); a string that reads as a
number is one (YAML 1.1 reads ``2e-4`` as a string); an int stays an int, so a config written to
config.json keeps the value as given (``epochs: 2``, not ``2.0``).
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BeforeValidator, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from .errors import LlmcalError

__all__ = ["says", "check_value", "Int", "Number", "PositiveInt", "NonNegativeInt", "PositiveNumber", "NonNegativeNumber",
           "OpenFraction", "Fraction", "PositiveFraction", "UnitInterval", "NonEmptyStr", "problems", "validated"]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


def says(phrase: str) -> WrapValidator:
    """Word every failure of the type it annotates as ``must be <phrase>`` (one message however it failed)."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("llmcal_value", "must be {phrase}", {"phrase": phrase}) from None

    return WrapValidator(check)


Int = Annotated[int, BeforeValidator(_not_bool)]
# int first: an int stays an int (smart union: the exact match wins); any other number becomes a float
Number = Annotated[Union[int, Annotated[float, Field(allow_inf_nan=False)]], BeforeValidator(_not_bool)]

PositiveInt = Annotated[Int, Field(ge=1), says("a positive integer")]
NonNegativeInt = Annotated[Int, Field(ge=0), says("an integer >= 0")]
PositiveNumber = Annotated[Number, Field(gt=0), says("a positive number")]
NonNegativeNumber = Annotated[Number, Field(ge=0), says("a finite number >= 0")]
OpenFraction = Annotated[Number, Field(gt=0, lt=1), says("a number strictly between 0 and 1")]
Fraction = Annotated[Number, Field(ge=0, lt=1), says("a number in [0, 1)")]
PositiveFraction = Annotated[Number, Field(gt=0, le=1), says("a number in (0, 1]")]
UnitInterval = Annotated[Number, Field(ge=0, le=1), says("a number in [0, 1]")]
NonEmptyStr = Annotated[str, Field(min_length=1), says("a non-empty string")]


# ---- wording ---------------------------------------------------------------------------------
def _choices(hint: Any) -> tuple | None:
    """The values of the ``Literal`` inside ``hint`` (through Annotated and Optional), or None."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if origin is Annotated:
        return _choices(typing.get_args(hint)[0])
    if origin is Union:
        found = [c for arg in typing.get_args(hint) for c in (_choices(arg) or ())]
        return tuple(found) or None
    return None


def problems(errors: list[dict], label: Callable[[str], str], hints: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name, message)`` for each of a ``ValidationError``'s ``errors()``; ``label(name)`` is how a message names the value
    (``--n-bins`` for a config field, ``n_bins`` for a parameter) and ``hints`` the annotations (for the
    choices of a ``Literal``).  An unknown name's message is ``unknown key 'NAME'``."""
    out: list[tuple[str, str]] = []
    for err in errors:
        loc = [x for x in err["loc"] if x != "[key]"]
        name = str(loc[0]) if loc else ""
        kind, value = err["type"], err.get("input")
        what = label(name) + "".join(f"[{x!r}]" for x in loc[1:])
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            out.append((name, f"unknown key {name!r}"))
        elif kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
            out.append((name, f"missing {what}"))
        elif kind == "literal_error" and _choices(hints.get(name)) is not None:
            choices = ", ".join(str(c) for c in _choices(hints[name]))
            out.append((name, f"unknown {what} {value!r}: choose one of {choices}"))
        elif kind == "llmcal_value":
            out.append((name, f"{what} {err['msg']} (got {value!r})"))
        else:
            msg = err["msg"]
            out.append((name, f"{what}: {msg[:1].lower()}{msg[1:]} (got {value!r})"))
    return list(dict.fromkeys(out))  # a union's members may word one problem alike


def _parameter_hints(fn: Callable) -> dict[str, Any]:
    """``fn``'s evaluated parameter annotations; one that names what only a type checker imports is left out
    (it is no constraint to check)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except NameError:
        hints = {}
        for name, p in inspect.signature(fn).parameters.items():
            try:
                hints[name] = eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation
            except NameError:
                pass
        return hints


# ---- values and functions --------------------------------------------------------------------
def check_value(tp: Any, value: Any, label: str) -> Any:
    """``value`` validated as a ``tp`` (a ``Literal``, a named type above); a bad one raises ``LlmcalError``
    naming it ``label`` (a flag, for a value that is no config's field: ``calibrate --method``)."""
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as e:
        errors = [{**err, "loc": (label, *err["loc"])} for err in e.errors()]
        raise LlmcalError("; ".join(m for _, m in problems(errors, str, {label: tp}))) from None


_ADAPTERS: dict[int, tuple[Any, Any]] = {}  # id(type) -> (the type, kept so that its id stays its own; its adapter)


def _adapter(tp: Any) -> Any:
    # by id: hashing an Annotated type hashes its metadata, which costs more than the check itself
    found = _ADAPTERS.get(id(tp))
    if found is None:
        from pydantic import TypeAdapter

        found = _ADAPTERS[id(tp)] = (tp, TypeAdapter(tp))
    return found[1]


def validated(fn: Callable) -> Callable:
    """Check ``fn``'s constrained parameters (annotated with the named types above or a ``Literal``) with pydantic
    on every call; a bad value raises ``LlmcalError`` naming the function and the parameter.

    Only those parameters are checked, when given (a default is the function's own), and passed on as
    validated (``"0.1"`` becomes 0.1); arrays and other arguments are passed on untouched.  No signature is
    bound per call: a check costs about what :func:`check_value` costs, per checked argument given.
    """
    hints = _parameter_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    checks = [(p.name, i if p.kind in positional else None, hints[p.name]) for i, p in enumerate(params)
              if typing.get_origin(hints.get(p.name)) is Annotated or _choices(hints.get(p.name)) is not None]
    where = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        changed: list | None = None
        for name, index, tp in checks:
            if name in kwargs:
                value = kwargs[name]
            elif index is not None and index < len(args):
                value = args[index]
            else:
                continue
            try:
                checked = _adapter(tp).validate_python(value)
            except ValidationError as e:
                errors = [{**err, "loc": (name, *err["loc"])} for err in e.errors()]
                raise LlmcalError(f"{where}: " + "; ".join(m for _, m in problems(errors, str, {name: tp}))) from None
            if checked is not value:
                if name in kwargs:
                    kwargs[name] = checked
                else:
                    changed = changed if changed is not None else list(args)
                    changed[index] = checked
        return fn(*(args if changed is None else changed), **kwargs)

    return wrapper
