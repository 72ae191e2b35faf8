"""The study config's YAML schema, as pydantic models (``load.load_study`` applies it).

Every mapping of the file is a model with ``extra="forbid"``, so an unknown or misspelt key is an
error.  The options of a cell (under ``defaults``, a model entry, a method, a sweep point) are the
fields of ``llmcal.evaluate.EvalConfig`` and ``llmcal.train.config.FinetuneConfig``, read with
``dataclasses.fields`` when a study is loaded, so the schema follows those classes.  A model's
``unknown``/``what`` and its fields' descriptions word the errors ``load`` reports.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, ClassVar, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt,
                      StrictStr, ValidationInfo, create_model, field_validator, model_validator)

from ..conformal import Score
from ..errors import LlmcalError
from ..validation import NonNegativeNumber, OpenFraction, PositiveInt, says
from .grid import DATA_KEYS, METHODS, NAME_RE, POINT_KEYS, ROLES, STUDY_SET, TOP_KEYS


# ---- field types -------------------------------------------------------------------------
def _name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{v!r} is not a usable name (letters, digits, . _ + -; it becomes a directory)")
    return v


def _str_keys(v: Any) -> Any:
    return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _one_or_many(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


Name = typing.Annotated[StrictStr, AfterValidator(_name)]
Subjects = typing.Annotated[list[typing.Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1),
                            says("a non-empty list of subject names")]


class ConfigModel(BaseModel):
    """A mapping of the config: unknown keys are errors; WHAT says what a value of it is."""

    model_config = ConfigDict(extra="forbid")
    WHAT: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.alias or n for n, f in cls.model_fields.items()]

    @classmethod
    def what(cls) -> str:
        return cls.WHAT or f"a mapping with {', '.join(cls.keys())}"

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown key; use {', '.join(cls.keys())}"


# ---- data entries ------------------------------------------------------------------------
class DataEntryModel(ConfigModel):
    WHAT: ClassVar[str] = f"a dataset spec or a mapping with {', '.join(DATA_KEYS)}"
    CHECK_SPLIT: ClassVar[bool] = True

    spec: StrictStr = Field(description="name the dataset (e.g. mmlu, a .jsonl file, "
                                        "synthetic:arithmetic?difficulty=2)")
    subjects: typing.Annotated[Optional[Subjects], BeforeValidator(_as_list)] = None
    limit: Optional[PositiveInt] = None
    mapping: Optional[dict] = None
    fractions: Optional[dict] = None
    split: Optional[StrictStr] = None  # after fractions: its names are the splits

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown data key; use {', '.join(DATA_KEYS)}"

    @model_validator(mode="before")
    @classmethod
    def _spec_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"spec": v}
        if not isinstance(v, dict):
            raise ValueError(f"a data entry is {cls.WHAT}; got {type(v).__name__}")
        return v

    @field_validator("spec")
    @classmethod
    def _spec(cls, v: str) -> str:
        if v is not None and not v.strip():
            raise ValueError(f"missing or empty: {cls.model_fields['spec'].description}")
        return v

    @field_validator("mapping", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            raise ValueError("must map our fields (question, choices, answer, ...) to columns")
        return v

    @field_validator("fractions", mode="before")
    @classmethod
    def _fractions(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ValueError("must map split names to fractions that sum to 1")
        from ..data.splits import check_fractions

        try:
            check_fractions(v)
        except LlmcalError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or not cls.CHECK_SPLIT:
            return v
        from ..data.splits import SPLITS

        names = list(info.data.get("fractions") or SPLITS)
        if v != "all" and v not in names:
            raise ValueError(f"{v!r} is not a split; choose one of {', '.join(names)} or all")
        return v


class PartialEntryModel(DataEntryModel):
    """A sweep point's change to a role's entry: any data keys, merged into the entry and checked as a whole."""

    WHAT: ClassVar[str] = f"a (partial) data entry: a mapping with {', '.join(DATA_KEYS)}"
    CHECK_SPLIT: ClassVar[bool] = False
    spec: Optional[StrictStr] = None

    @model_validator(mode="before")
    @classmethod
    def _spec_string(cls, v: Any) -> Any:
        return v


EMPTY_ROLE = "an empty list; give at least one data entry"
Entries = typing.Annotated[list[DataEntryModel], BeforeValidator(_one_or_many), Field(min_length=1)]


class _Roles(ConfigModel):
    WHAT: ClassVar[str] = f"a mapping of roles ({', '.join(ROLES)}) to data entries"
    train: Optional[Entries] = Field(None, description=EMPTY_ROLE)
    test: Optional[Entries] = Field(None, description=EMPTY_ROLE)
    ood: Optional[Entries] = Field(None, description=EMPTY_ROLE)
    calib: Optional[Entries] = Field(None, description=EMPTY_ROLE)

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown role; the roles are {', '.join(ROLES)}"


class _PointRoles(_Roles):
    """A sweep point's data: per role a partial entry (merged) or entries (replacing the role); see _point_data."""

    train: Any = None
    test: Any = None
    ood: Any = None
    calib: Any = None


# ---- options, models, sweep points, the file -------------------------------------------------
class _Options(ConfigModel):
    """Cell options: one optional field per config field (aliased: a field may be named like a pydantic method)."""

    KIND: ClassVar[str] = "cell"

    @classmethod
    def options(cls) -> list[str]:
        return sorted(f.alias for f in cls.model_fields.values() if f.alias)

    @classmethod
    def unknown(cls, key: str) -> str:
        if key in STUDY_SET:
            return f"is set by the study; say it in {STUDY_SET[key]}"
        close = difflib.get_close_matches(key, cls.options(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown option{hint}; {cls.KIND} options are: {', '.join(cls.options())}"


class _EvalOptions(_Options):
    KIND: ClassVar[str] = "evaluation (EvalConfig)"


class _TrainOptions(_Options):
    KIND: ClassVar[str] = "fine-tuning (FinetuneConfig)"


class _ModelBase(_Options):
    WHAT: ClassVar[str] = "a model name or a mapping with `model:` and options"
    model: StrictStr = Field(description="an alias, hub id, local directory or GGUF file")
    methods: typing.Annotated[Optional[list[StrictStr]], BeforeValidator(_as_list)] = None

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"missing: {cls.model_fields['model'].description}")
        return v


class _PointBase(ConfigModel):
    WHAT: ClassVar[str] = f"a mapping with {', '.join(POINT_KEYS)}"
    vars: Optional[dict] = None
    data: Optional[_PointRoles] = None

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown key; a sweep point has {', '.join(POINT_KEYS)}"

    @model_validator(mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        return {} if v is None else v


class _Regime(ConfigModel):
    WHAT: ClassVar[str] = "false or a mapping with from / tolerance"
    from_: Optional[StrictStr] = Field(None, alias="from")
    tolerance: Optional[NonNegativeNumber] = None


class _Conformal(ConfigModel):
    WHAT: ClassVar[str] = "false, true or a mapping with alpha / score"
    alpha: OpenFraction = 0.1
    score: Score = "lac"


def _conformal_in(v: Any) -> Any:
    return {} if v is True else None if v is False else v


def _regime_in(v: Any) -> Any:
    return {} if v is True else None if v is False else v


def _posthoc_in(v: Any) -> Any:
    """``all``/true (every method that runs without the model), false/[] (none) or a list of names."""
    from .posthoc import available, check_names

    if v is True or v == "all":
        return list(available())
    if v is False or v is None:
        return []
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"must be all, false or a list of post-hoc methods ({', '.join(available())}); "
                         f"got {v!r}")
    if "all" in names:
        raise ValueError("all stands alone: `posthoc: all`, or list the methods")
    return list(check_names([n.strip().lower() for n in names]))


def _methods_in(v: Any) -> Any:
    if isinstance(v, list):  # [none, ts, cft] is allowed for methods without options
        if not all(isinstance(m, str) for m in v):
            raise ValueError("a list of methods must hold method names; use a mapping for options")
        return {m: {} for m in v}
    return v


class _FileBase(ConfigModel):
    name: Optional[Name] = None
    description: Optional[StrictStr] = None
    seed: StrictInt = 0
    data: _Roles = Field(description="give at least data.test (and data.train for fine-tuning)")
    methods: typing.Annotated[dict[Name, Optional[dict]], BeforeValidator(_methods_in)] = Field(
        min_length=1, description=f"name at least one of {', '.join(METHODS)}")
    regime: typing.Annotated[Optional[_Regime], BeforeValidator(_regime_in)] = Field(default_factory=_Regime)
    posthoc: typing.Annotated[list[StrictStr], BeforeValidator(_posthoc_in)] = Field(default="all",
                                                                                    validate_default=True)
    conformal: typing.Annotated[Optional[_Conformal], BeforeValidator(_conformal_in)] = None

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown key; a study has {', '.join(TOP_KEYS)}"


@dataclasses.dataclass(frozen=True)
class Schema:
    file: type[_FileBase]
    eval: type[_Options]
    train: type[_Options] | None


def option_fields() -> tuple[set[str], set[str] | None]:
    """The option names of none/ts cells (EvalConfig) and of training cells (FinetuneConfig; None without train)."""
    from ..evaluate import EvalConfig

    ev = {f.name for f in dataclasses.fields(EvalConfig)}
    try:
        from ..train.config import FinetuneConfig
    except ImportError:
        return ev, None
    return ev, {f.name for f in dataclasses.fields(FinetuneConfig)}


def _options_model(name: str, base: type[_Options], names: set[str], skip: tuple = ()) -> type:
    fields = {f"opt_{i}": (Any, Field(None, alias=n))
              for i, n in enumerate(sorted(names - set(STUDY_SET) - set(skip)))}
    return create_model(name, __base__=base, **fields)


@functools.lru_cache(maxsize=8)
def _schema(eval_fields: frozenset, train_fields: frozenset | None) -> Schema:
    """The file's models for these option fields (built per field set: the config classes may change)."""
    any_fields = set(eval_fields) | set(train_fields or ())
    cell = _options_model("CellOptions", _Options, any_fields)
    model = _options_model("ModelEntry", _ModelBase, any_fields, skip=("model", "methods"))
    point = create_model("SweepPoint", __base__=_PointBase, options=(Optional[cell], None))
    points = typing.Annotated[dict[Name, point], BeforeValidator(_str_keys)]
    file = create_model(
        "StudyFile", __base__=_FileBase,
        defaults=(Optional[cell], None),
        models=(dict[Name, model], Field(min_length=1, description="name at least one model "
                                                                    "(key: {model: NAME, options...})")),
        sweep=(Optional[dict[str, points]], None))
    return Schema(file=file, eval=_options_model("EvalOptions", _EvalOptions, set(eval_fields)),
                   train=_options_model("TrainOptions", _TrainOptions, set(train_fields))
                   if train_fields is not None else None)


def schema_for(eval_fields: set[str], train_fields: set[str] | None) -> Schema:
    return _schema(frozenset(eval_fields), frozenset(train_fields) if train_fields is not None else None)
