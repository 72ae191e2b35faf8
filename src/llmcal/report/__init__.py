"""Reports: reliability diagrams, result tables, per-run, comparison and post-hoc comparison reports."""
from .plots import accuracy_ece_plane, reliability_figure, reliability_grid, save_reliability
from .posthocreport import write_posthoc_report
from .runreport import write_comparison, write_run_report
from .tables import html_table, markdown_table, result_row, results_rows

__all__ = [
    "accuracy_ece_plane",
    "html_table",
    "markdown_table",
    "reliability_figure",
    "reliability_grid",
    "result_row",
    "results_rows",
    "save_reliability",
    "write_comparison",
    "write_posthoc_report",
    "write_run_report",
]
