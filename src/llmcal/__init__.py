"""llmcal: measure and restore the calibration of preference-aligned language models.

The few names a user needs, imported on first use (``import llmcal`` loads no torch)::

    import llmcal

    rec = llmcal.evaluate("smollm2-135m-instruct", "mmlu", out="runs/eval", limit=100)
    print(rec.metrics["accuracy"], rec.metrics["conf_ece"])

``evaluate``, ``calibrate`` (temperature scaling, CFT/RCFT/auto, post-hoc
methods on a finished run) and ``diagnose`` (the regime diagnosis) write a run
directory and return its record; ``load_run`` reads one back.  See docs/api.md.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it (relative to this package)
_EXPORTS = {
    "evaluate": ".api", "calibrate": ".api", "diagnose": ".api",
    "load_run": ".runs", "RunRecord": ".runs", "RunResult": ".runs",
    "EvalConfig": ".evaluate", "FinetuneConfig": ".train.config", "RegimeConfig": ".regime",
    "Diagnosis": ".regime", "Prediction": ".predictions", "Question": ".data.schema", "LlmcalError": ".errors",
}

__all__ = ["__version__", "evaluate", "calibrate", "diagnose", "load_run", "RunRecord", "RunResult", "EvalConfig",
           "FinetuneConfig", "RegimeConfig", "Diagnosis", "Prediction", "Question", "LlmcalError"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time they load lazily (PEP 562)
    from .api import calibrate, diagnose, evaluate
    from .data.schema import Question
    from .errors import LlmcalError
    from .evaluate import EvalConfig
    from .predictions import Prediction
    from .regime import Diagnosis, RegimeConfig
    from .runs import RunRecord, RunResult, load_run
    from .train.config import FinetuneConfig


# ``llmcal.evaluate`` is the function; ``llmcal/evaluate.py`` (``from llmcal.evaluate import EvalConfig``) is the
# module behind it.  Importing a submodule binds it as an attribute of its package, which would hide the function:
# the package refuses that one binding, so the module stays reachable through imports and ``sys.modules`` only.
_SHADOWED_MODULES = {"evaluate"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access does not come here again
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
