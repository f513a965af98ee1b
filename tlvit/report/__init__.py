"""Regenerate the papers' tables with paper and reproduced values side by side, plus figures.

Inputs: `experiments/tables/*.yaml` (the papers' numbers, typed once), `experiments/rows.yaml` and the
row metrics written by the train stages (`metrics/<preset>/rows/<row>.json`); training curves from MLflow
when its store answers (the metrics hold a copy, checked against it). A row that has not run shows as
pending, never as a number.

Modules: `results` (each row's seeds and status), `stats` (CIs, verdicts), `frames` (tables as data and
Markdown), `figures` (Δ bars, ablation path, scaling, curves), `curves` (per-epoch series: source and
check), `dense_labels`, `alignment` (TL-Align figures on checkpoints), `build` (writes reports/<preset>/ and its index).
"""
from tlvit.report.build import build_report, write_text
from tlvit.report.dense_labels import dense_label_table
from tlvit.report.figures import curves_figure, delta_figure, path_figure, scaling_figure
from tlvit.report.frames import claims_frame, render_markdown, table_frame
from tlvit.report.results import Results, RowResult
from tlvit.report.stats import ci95, diff_ci95, verdict
from tlvit.tables import PAPERS, Table, load_tables

PENDING = "pending"

__all__ = [
    "PAPERS", "PENDING", "Results", "RowResult", "Table", "build_report", "ci95", "claims_frame", "curves_figure",
    "delta_figure", "dense_label_table", "diff_ci95", "load_tables", "path_figure", "render_markdown", "scaling_figure",
    "table_frame", "verdict", "write_text",
]
