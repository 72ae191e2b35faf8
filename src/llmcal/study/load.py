"""Loading a study config: the YAML checked against the schema, sweep points expanded, every cell's config built once.

An error names the file, the key path as written (``methods.cft.epochs``) and its YAML line: pydantic's
error locations are followed through the composed YAML nodes.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import LlmcalError
from .grid import (METHODS, REGIME, ROLES, TOP_KEYS, TRAINING, DataEntry, MethodEntry, ModelEntry, Point, Study, bad,
                   eval_config, finetune_config, option_key)
from .schema import (EMPTY_ROLE, ConfigModel, DataEntryModel, Entries, PartialEntryModel, Schema, option_fields,
                     schema_for)


# ---- where an error is ---------------------------------------------------------------------
def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union or type(tp).__name__ == "UnionType":
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _walk(tp: Any, loc: tuple) -> tuple[Any, Any, Any]:
    """Follow ``loc`` through the model types: (the model holding the last key, that key's field, its type)."""
    owner = fld = None
    for el in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            fld = next((f for n, f in tp.model_fields.items() if (f.alias or n) == el), None)
            tp = fld.annotation if fld is not None else None
        elif typing.get_origin(tp) in (dict, list):
            tp, fld = typing.get_args(tp)[-1], None
        else:
            tp = fld = None
    return owner, fld, _unwrap(tp) if tp is not None else None


def _message(err: dict, owner: Any, fld: Any, tp: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden" and owner is not None:
        return owner.unknown(str(err["loc"][-1]))
    desc = fld.description if fld is not None else None
    if kind == "too_short" and (desc == EMPTY_ROLE or value == []):
        return EMPTY_ROLE
    if kind in ("missing", "too_short"):
        return f"missing: {desc}" if desc else "missing"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in ("model_type", "model_attributes_type") and isinstance(tp, type) and issubclass(tp, ConfigModel):
        return f"must be {tp.what()}, got {type(value).__name__}"
    if kind == "literal_error" and typing.get_origin(tp) is typing.Literal:
        return f"unknown {err['loc'][-1]} {value!r}: choose one of {', '.join(map(str, typing.get_args(tp)))}"
    msg = err["msg"]
    return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"


class _Where:
    """Names a place in the config: its key path as written, and its line in the YAML file."""

    def __init__(self, path: Path, root: Any):
        self.path, self.root = path, root

    def locate(self, loc: tuple) -> tuple[str, int | None]:
        """(key path, line) of ``loc``; a list index the file does not have (one entry given without a list) is
        left out; no line for a key the file does not have."""
        import yaml

        node, parts, line = self.root, [], None
        for el in loc:
            if isinstance(el, int):
                if isinstance(node, yaml.SequenceNode) and 0 <= el < len(node.value):
                    node = node.value[el]
                    parts.append(f"[{el}]")
                    line = node.start_mark.line + 1
                elif node is None:
                    parts.append(f"[{el}]")
                continue
            parts.append(f".{el}" if parts else str(el))
            found = None
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(el)),
                             None)
            elif isinstance(node, yaml.SequenceNode):  # methods: [none, ts]
                found = next(((v, v) for v in node.value if isinstance(v, yaml.ScalarNode) and v.value == str(el)),
                             None)
            node, line = (found[1], found[0].start_mark.line + 1) if found else (None, None)
        return "".join(parts), line

    def error(self, loc: tuple, msg: str, *, label: str | None = None) -> LlmcalError:
        key, line = self.locate(loc)
        if label is not None:  # a place the file does not hold as such (a merged sweep entry)
            return bad(self.path, label + "".join(f".{x}" for x in loc if isinstance(x, str)), msg)
        return bad(self.path, f"{key} (line {line})" if line else key, msg)

    def validate(self, cls: Any, value: Any, loc: tuple = (), *, label: str | None = None) -> Any:
        """``cls`` validated from ``value`` found at ``loc``; every problem named (key path and line) in one error."""
        from pydantic import TypeAdapter

        try:
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                return cls.model_validate(value)
            return TypeAdapter(cls).validate_python(value)
        except ValidationError as e:
            found = {}
            for err in e.errors():
                sub = tuple(x for x in err["loc"] if x != "[key]")  # a bad dict key: the key itself
                msg = str(self.error(loc + sub, _message(err, *_walk(cls, sub)), label=label))
                found.setdefault(msg, self.locate(loc + sub)[1])
            # in the order of the file, so that the first line printed is the first problem in it
            raise LlmcalError("\n".join(sorted(found, key=lambda m: found[m] or float("inf")))) from None


# ---- loading -------------------------------------------------------------------------------
def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study config; raises LlmcalError naming the file, the key and its line for any problem.

    Nothing is loaded or downloaded: datasets and models are checked when the study runs.
    """
    import yaml

    path = Path(path)
    from ..yamlio import load_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LlmcalError(f"{path}: cannot read the study config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise LlmcalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = load_yaml(text, path)  # a key given twice is refused with both lines
    root = yaml.compose(text)
    if not isinstance(raw, dict):
        raise LlmcalError(f"{path}: a study config is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    where = _Where(path, root)
    eval_fields, train_fields = option_fields()
    schema = schema_for(eval_fields, train_fields)
    f = where.validate(schema.file, raw)

    # Options are kept as written, in their order (study.json shows them): the schema checked their names, the
    # config classes check their values (_check_cells).
    models = [ModelEntry(key=key, model=m.model, methods=tuple(m.methods) if m.methods is not None else None,
                         options=_given(raw["models"][key], skip=("model", "methods")))
              for key, m in f.models.items()]
    methods = [_method(where, schema, key, opts or {}) for key, opts in f.methods.items()]
    keys = {m.key for m in methods}
    for m in models:
        for k in m.methods or ():
            if k not in keys:
                raise where.error(("models", m.key, "methods"), f"{k!r} is not a key of methods ({', '.join(keys)})")

    for name in f.posthoc:  # a post-hoc row and a method key of the same name would share a table row label
        if name in keys:
            raise where.error(("methods", name), f"{name!r} names a post-hoc method the study adds (posthoc:); "
                                                 f"choose another key, or leave {name} out of posthoc")
    data = {role: tuple(_entry(e) for e in getattr(f.data, role)) for role in ROLES
            if getattr(f.data, role) is not None}
    points = _sweep(where, raw.get("sweep"), f.sweep)
    roles_any = set(data) | {r for p in points for r in p.data}
    if "test" not in roles_any:
        raise where.error(("data", "test"), "missing: the in-domain test set every method is measured on")
    if "train" not in roles_any:
        for m in methods:
            if m.training:
                raise where.error(("data", "train"), f"missing: methods.{m.key} ({m.method}) trains on it")
        if "calib" not in roles_any:
            for m in methods:
                if m.method == "ts":
                    raise where.error(("data", "calib"), f"missing: methods.{m.key} fits its temperature on "
                                                         f"data.calib (or data.train when there is no calib)")

    regime_from, tolerance = None, None
    if f.regime is not None:
        regime_from = f.regime.from_
        if regime_from is None:
            regime_from = next((m.key for m in methods if m.method == "cft"), None)
        elif not any(m.key == regime_from and m.training for m in methods):
            raise where.error(("regime", "from"), f"{regime_from!r} is not a fine-tuning method key of methods")
        tolerance = f.regime.tolerance

    study = Study(path=path, name=f.name if f.name is not None else path.stem,
                  description=(f.description or "").strip(), seed=f.seed, defaults=_given(raw.get("defaults")),
                  models=tuple(models), data=data, methods=tuple(methods), points=points,
                  regime_from=regime_from, tolerance=tolerance, raw=raw,
                  point_roles={p.name: _point_data(where, data, p) for p in points}, posthoc=tuple(f.posthoc),
                  conformal=None if f.conformal is None else {"alpha": f.conformal.alpha, "score": f.conformal.score})
    _check_cells(where, study)
    return study


def _given(section: Any, skip: tuple = ()) -> dict:
    return {k: v for k, v in section.items() if k not in skip} if isinstance(section, dict) else {}


def _entry(e: DataEntryModel) -> DataEntry:
    return DataEntry(spec=e.spec, subjects=tuple(e.subjects) if e.subjects is not None else None,
                     split=None if e.split == "all" else e.split, limit=e.limit, mapping=e.mapping,
                     fractions=e.fractions)


def _method(where: _Where, schema: Schema, key: str, given: dict) -> MethodEntry:
    """A method entry: its method (the key, or ``method:``), its options checked against that method's config."""
    loc = ("methods", key)
    if key == REGIME:
        raise where.error(loc, "'regime' names the diagnosis cell; choose another key")
    opts = dict(given)
    explicit = "method" in opts
    method = opts.pop("method", key)
    if method not in METHODS:
        raise where.error(loc + (("method",) if explicit else ()),
                          f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
                          + ("" if explicit else " (or give `method:` for a method under another key)"))
    if method in TRAINING and schema.train is None:
        raise where.error(loc, f"{method} needs llmcal.train, which is not installed here")
    where.validate(schema.train if method in TRAINING else schema.eval, opts, loc)
    return MethodEntry(key=key, method=method, options=opts)


def _sweep(where: _Where, raw: Any, sweep: dict | None) -> tuple[Point, ...]:
    """The sweep's points: the product of its axes, names joined by '-', later axes overriding earlier ones."""
    if sweep is None:
        return (Point(""),)
    if not sweep:
        raise where.error(("sweep",), "must map axis names to {point name: overrides}")
    axes = []
    for axis, pts in sweep.items():
        if not pts:
            raise where.error(("sweep", axis), "must map point names to overrides (vars / data / options)")
        parsed, given_pts = [], {str(k): v for k, v in raw[axis].items()}
        for pname, pt in pts.items():
            given = given_pts[pname] or {}
            pdata = dict(given.get("data") or {})
            for role, ov in pdata.items():
                loc = ("sweep", axis, pname, "data", role)
                if isinstance(ov, dict):
                    where.validate(PartialEntryModel, ov, loc)
                else:
                    where.validate(Entries, ov, loc)
            parsed.append(Point(pname, dict(pt.vars or {}), pdata, _given(given.get("options"))))
        axes.append(parsed)
    points = [Point("")]
    for axis in axes:
        points = [Point("-".join(n for n in (p.name, q.name) if n), {**p.vars, **q.vars}, _merge_data(p.data, q.data),
                        {**p.options, **q.options}) for p in points for q in axis]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise where.error(("sweep",), f"point names collide "
                                      f"({', '.join(sorted(n for n in names if names.count(n) > 1))})")
    return tuple(points)


def _merge_data(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for role, e in b.items():
        if isinstance(e, dict) and isinstance(out.get(role), dict):
            out[role] = {**out[role], **e}
        else:
            out[role] = copy.deepcopy(e)
    return out


def _point_data(where: _Where, data: dict, point: Point) -> dict[str, tuple[DataEntry, ...]]:
    """The data roles of a point, ``{var}`` placeholders filled in.  A point's mapping for a role is merged
    into the role's (single) entry; a spec string or a list replaces the role."""
    out = dict(data)
    for role, ov in point.data.items():
        label = f"sweep point {point.name}: data.{role}"
        if isinstance(ov, dict) and role in out:
            if len(out[role]) != 1:
                raise bad(where.path, label, f"data.{role} is a list of entries; a sweep point can only replace "
                                             f"it (with a spec string or a list of entries)")
            out[role] = (_entry(where.validate(DataEntryModel, {**out[role][0].to_dict(), **ov}, label=label)),)
        else:
            out[role] = tuple(_entry(e) for e in where.validate(Entries, ov, label=label))
    return {role: tuple(_fill_vars(where, e, point, role) for e in entries) for role, entries in out.items()}


def _fill_vars(where: _Where, e: DataEntry, point: Point, role: str) -> DataEntry:
    if "{" not in e.spec:
        return e
    try:
        spec = e.spec.format_map(point.vars)
    except KeyError as k:
        scope = f"sweep point {point.name!r}" if point.name else "the study (no sweep point sets it)"
        raise bad(where.path, f"data.{role}.spec", f"{e.spec!r} uses the variable {k} that {scope} does not "
                                                   f"define (set it under sweep: <axis>: <point>: vars:)") from None
    except (ValueError, IndexError) as x:
        raise bad(where.path, f"data.{role}.spec", f"{e.spec!r}: bad placeholder ({x})") from None
    return dataclasses.replace(e, spec=spec)


def _source(where: _Where, study: Study, cell: Any, key: tuple) -> str:
    """Where option ``key`` of ``cell`` was set (the last of defaults < model < method < sweep point that sets it),
    as ``section.key (line N)``; the cell's own key path when no section names it."""
    sections = [(("defaults",), study.defaults), (("models", cell.model.key), cell.model.options)]
    method = cell.method or next((m for m in study.methods if m.key == study.regime_from), None)
    if method is not None:
        sections.append((("methods", method.key), method.options))
    if key[0] in cell.point.options:
        return f"sweep point {cell.point.name}: options.{'.'.join(key)}"
    for loc, opts in reversed(sections):
        if key[0] in opts:
            path, line = where.locate(loc + key)
            if not line:  # a nested key the file spells differently: its section's line
                path, line = where.locate(loc + key[:1])
            return f"{path} (line {line})" if line else path
    return option_key(study, cell)


def _culprit(study: Study, cell: Any, message: str) -> tuple | None:
    """The option of the cell a config error is about (a key path): the one whose flag or name the message names."""
    opts = study.options(cell)
    for k in sorted(opts.get("training_args") or {}, key=len, reverse=True):
        if f"{k}=" in message or f"{k!r}" in message:
            return ("training_args", k)
    for key in sorted(opts, key=len, reverse=True):
        if f"--{key.replace('_', '-')}" in message or f"{key!r}" in message or re.search(rf"(^|\s){key}:", message):
            return (key,)
    return None


def _check_cells(where: _Where, study: Study) -> None:
    """Build every cell's config once (pydantic checks each option's type then) and check the rules between its
    options (no data, no model), so bad values fail now, naming the YAML file, the key that set the value and
    its line."""
    from ..evaluate import _check

    def fail(cell: Any, e: LlmcalError) -> LlmcalError:
        msg = str(e)
        if msg.startswith(f"{study.path}: "):  # the study's own error (grid): it names its place
            return e
        key = _culprit(study, cell, msg)
        place = _source(where, study, cell, key) if key else option_key(study, cell)
        return bad(study.path, place, f"{msg} (cell {cell.name})")

    for point in study.points:
        data = study.point_data(point)
        if "test" not in data:
            raise bad(study.path, "data.test", f"missing for sweep point {point.name!r}")
        for cell in study.cells():
            if cell.point is not point:
                continue
            paths = {r: f"<{r}>" for r in data}
            if cell.kind in TRAINING:
                if "train" not in data:
                    raise bad(study.path, "data.train", f"missing for sweep point {point.name!r}")
                from ..train.config import validate

                try:
                    validate(finetune_config(study, cell, paths, resume=False))
                except LlmcalError as e:
                    raise fail(cell, e) from None
            elif cell.kind in ("none", "ts"):
                try:
                    _check(eval_config(study, cell, paths))
                except LlmcalError as e:
                    raise fail(cell, e) from None
