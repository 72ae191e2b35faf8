"""Studies: a grid of (model x method [x sweep point]) runs from one YAML file, and one report over it.

The library API behind ``llmcal study CONFIG.yaml --out DIR``.  A study answers
three questions about a set of models: is each one overconfident (``none``),
what does each fix do to accuracy and calibration in and out of domain (``ts``,
``cft``, ``rcft``, ``auto``), and which fix does the model need (the regime
diagnosis, docs/reference.md).

Config format
-------------
::

    name: offline                  # optional; default: the file name
    description: free text         # optional; shown in the report
    seed: 0                        # data selection (splits, limits, synthetic tasks) and every cell's seed
    defaults:                      # options for every cell (see "Options" below)
      dtype: float32
      device: cpu
    models:                        # key -> {model: NAME, options...} or just NAME
      smol: smollm2-135m-instruct
      gemma: {model: gemma3-270m, template: plain}
      sft: {model: some/sft-checkpoint, methods: [none, ts]}   # `methods`: only these cells for this model
    data:                          # roles; each is one entry or a list of entries (concatenated)
      train: {spec: mmlu, subjects: [anatomy, virology], split: train, limit: 240}
      test:  {spec: mmlu, subjects: [anatomy, virology], split: test, limit: 200}   # in-domain test
      ood:   {spec: mmlu, subjects: [marketing], limit: 200}                       # optional
      calib: ...                   # optional: TS is fitted on it (default: on data.train)
    methods:                       # key -> options; the key is the method, or give `method:` explicitly
      none: {}
      ts: {}
      cft: {epochs: 2}
      rcft: {epochs: 2, rcft_lambda: 1.0}
      cft-long: {method: cft, epochs: 5}
    sweep:                         # optional: axes -> points -> overrides; cells = product of the axes
      difficulty:
        easy: {vars: {difficulty: 1}}          # `{difficulty}` in data specs is replaced
        hard: {vars: {difficulty: 4}}
      budget:
        broad: {data: {train: {limit: 200}}, options: {epochs: 2}}
        narrow: {data: {train: {limit: 48}}, options: {epochs: 8}}
    regime: {from: cft, tolerance: 0.05}       # optional; `regime: false` turns the diagnosis off
    posthoc: [vector, isotonic]    # optional; default all: every post-hoc method that runs without the model
                                   # (docs/posthoc.md), fitted on the ts cell's stored predictions; false: none
    conformal: {alpha: 0.1, score: lac}   # optional, off by default: conformal sets of every cell (conformal.py)

A data entry is a dataset spec string or a mapping with ``spec`` (any spec of
``llmcal.data.load_dataset``), ``subjects``, ``split`` (a hash split of
``fractions``, default ``data.splits.SPLITS``: train 60% / calib 20%
/ test 20%, so ``split: train`` and ``split: test`` of one dataset are
disjoint; the hash is of the id and ``seed + SPLIT_SALT``, independent of the
held-out slice fine-tuning takes out of ``train`` with ``seed``), ``limit``
(the same stable subset as ``load_dataset``'s) and ``mapping`` (column mapping
of local files).  Roles:
``train`` (in-domain training data; required by cft/rcft/auto), ``test``
(in-domain test; required), ``ood`` (out-of-domain test) and ``calib`` (the
questions temperature scaling is fitted on; default ``train``).  Roles must not
share question ids (``calib`` may equal ``train``); the study checks this
before any model is loaded.

Options are fields of ``llmcal.evaluate.EvalConfig`` (none, ts) or of
``llmcal.train.config.FinetuneConfig`` (cft, rcft, auto); an option in
``defaults``, a model entry or a sweep point goes to every cell whose config
has that field (``epochs`` in ``defaults`` applies to the training cells
only).  Precedence: defaults < model < method < sweep point.  Fields the study
sets itself (data, splits, limits, subjects, method, resume) are refused with
a pointer to ``data:``.

Cells and outputs
-----------------
Each (model, method[, point]) is a cell, one run directory
``DIR/runs/<model>/<method>[-<point>]``:

- ``none``: the model scored on every test role (results labelled ``none``);
- ``ts``: temperature fitted on ``calib`` (or ``train``) and applied to every
  test role (results ``none`` and ``ts``); unlike ``llmcal calibrate --method
  ts``, which fits on a slice of its own evaluation set, the fit uses
  in-domain questions that no test role contains, so every method is measured
  on exactly the same questions and the OOD result shows how an in-domain
  temperature transfers;
- ``cft``/``rcft``/``auto``: ``llmcal.train.run.run_finetune`` on ``train``,
  evaluated on every test role before (``none``) and after (the method);
- ``regime`` (one per model and point, after the ``regime.from`` cell): the
  fine-tuned model scored on the questions it was trained on; with its
  in-domain test predictions this is the regime diagnosis
  (``llmcal.regime.diagnose_predictions``: train accuracy - held-out accuracy
  against the tolerance, the ECE lower bound, the recommended method).

Post-hoc rows (``posthoc:``, ``study.posthoc``): for each model and point with a complete ``ts`` cell,
every named method of ``llmcal.posthoc`` is fitted on that cell's calibration predictions and applied to
its base-model predictions of each test role, no model loaded (``posthoc.py``); they appear next to the
cells in the report's per-domain tables and in study.json's ``posthoc``.  Every result also carries AURC,
accuracy at 80% / 50% coverage, its accuracy change and its risk-coverage curve.

Data roles are written once per point to ``DIR/data/<hash>/<role>.jsonl`` (the
hash is of the content, so changed data means a new path and a changed cell
config).  A cell whose run is complete is skipped when its stored config
matches (else an error names the differing keys; ``overwrite`` reruns);
an interrupted cell resumes through its run's own resume (predictions on
disk, training checkpoints).  Base-model predictions are shared: a ``none`` or
``ts`` cell copies the base-model predictions that an earlier cell of the same
model scored on the same data file with the same template, dtype and device,
so each test set is scored with the base model only once per cell that must
(training cells score their own "before").  A failed cell does not stop the
others; the study raises at the end, and rerunning resumes.

Outputs: ``DIR/report.md`` and ``DIR/report.html`` (self-contained), the
figures (``reliability-<domain>[-<point>].png`` grids of rows = models, columns
= methods; ``plane*.png`` accuracy / conf-ECE planes; ``risk-coverage-<domain>[-<model>[-<point>]].png``,
one curve per method), ``DIR/study.json`` (all
numbers; ``write_results_md`` reads it) and ``DIR/timings.json`` (wall seconds
per cell, summed over sessions).  ``report_from_dir(DIR)`` rewrites the report
without running anything; ``write_results_md([DIR, ...], "studies/RESULTS.md")``
writes the results page from the study.json files, next to the paper's numbers
(``paper_numbers()``, from ``llmcal/assets/paper_numbers.yaml``).

Modules, in the order a study goes through them: ``grid`` (the loaded study: entries, points,
cells), ``schema`` (the YAML schema, pydantic) and ``load`` (``load_study``), ``runner``
(``run_study``, ``report_from_dir``), ``cells`` (data and one runner per cell kind), ``collect``
(study.json), ``posthoc`` (the post-hoc rows and every result's selective numbers), ``report`` (report.md/html through the templates in ``templates/``), ``results``
(RESULTS.md).
"""
from __future__ import annotations

from .cells import PointData
from .collect import collect, method_rows
from .grid import (DOMAIN, EVAL_ROLES, METHODS, POSTHOC, REGIME, ROLES, SPLIT_SALT, TRAINING, Cell, DataEntry,
                   MethodEntry, ModelEntry, Point, Study)
from .load import load_study
from .report import write_report
from .results import observations, paper_numbers, write_results_md
from .runner import Context, report_from_dir, run_study

__all__ = [
    "load_study", "run_study", "report_from_dir", "write_results_md", "write_report", "collect", "method_rows",
    "observations", "paper_numbers", "Study", "Cell", "Point", "DataEntry", "ModelEntry", "MethodEntry",
    "PointData", "Context", "ROLES", "EVAL_ROLES", "DOMAIN", "POSTHOC", "TRAINING", "METHODS", "REGIME",
    "SPLIT_SALT",
]
