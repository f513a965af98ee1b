"""Regenerate the papers' tables with paper and reproduced values side by side, plus figures.

Inputs: `experiments/tables/*.yaml` (the papers' numbers, typed once) and the row metrics written
by the train stages (`metrics/<preset>/rows/<row>.json`). A row that has not run shows as pending,
never as a number.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tlvit.config import read_yaml
from tlvit.io import atomic_path
from tlvit.layout import Layout

PENDING = "pending"
PAPERS = {"lvvit": "LV-ViT", "tlalign": "TL-Align"}
# two-sided 95% Student-t quantiles by degrees of freedom (n - 1); n >= 31 uses the normal value
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def ci95(values: list[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean (None for a single value)."""
    n = len(values)
    if n < 2:
        return None
    dof = n - 1
    t = T95.get(dof) or T95[max(k for k in T95 if k <= dof)] if dof <= 30 else 1.96
    return t * statistics.stdev(values) / math.sqrt(n)


@dataclass
class Table:
    key: str
    title: str
    source: dict
    metric: str
    rows: list[dict]

    @classmethod
    def load(cls, path: Path) -> "Table":
        d = read_yaml(path)
        return cls(path.stem, d["title"], d["source"], d.get("metric", "top1"), d["rows"])

    @property
    def caption(self) -> str:
        s = self.source
        return f"{PAPERS.get(s['paper'], s['paper'])} Table {s['table']}: {self.title}"


def load_tables(directory: str | Path = "experiments/tables") -> list[Table]:
    return [Table.load(p) for p in sorted(Path(directory).glob("*.yaml"))]


def load_row_metrics(layout: Layout, row: str) -> dict | None:
    path = layout.row_metrics(row)
    return json.loads(path.read_text()) if path.is_file() else None


def table_frame(table: Table, layout: Layout) -> pd.DataFrame:
    """One line per paper row: paper value, reproduced mean (± 95% CI), deltas to the table's first row, provenance."""
    lines = []
    base_paper = base_repro = None
    for i, r in enumerate(table.rows):
        m = load_row_metrics(layout, r["row"])
        values = [run["top1"] for run in m["runs"]] if m else []
        repro = statistics.fmean(values) if values else None
        if i == 0:
            base_paper, base_repro = r.get("paper"), repro
        ci = ci95(values)
        lines.append({
            "Row": r["label"],
            "Paper": r.get("paper"),
            "Reproduced": repro,
            "± 95% CI": ci,
            "Paper Δ": None if i == 0 or r.get("paper") is None or base_paper is None else r["paper"] - base_paper,
            "Reproduced Δ": None if i == 0 or repro is None or base_repro is None else repro - base_repro,
            "Seeds": len(values),
            "MLflow runs": ", ".join(run["mlflow_run_id"] or "-" for run in m["runs"]) if m else PENDING,
            "Commit": ", ".join(sorted({run["git_commit"][:12] for run in m["runs"]})) if m else PENDING,
            "Config": m["config_hash"] if m else PENDING,
            "row_id": r["row"],
        })
    return pd.DataFrame(lines)


def _fmt(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def render_markdown(table: Table, df: pd.DataFrame, preset: str) -> str:
    shown = pd.DataFrame({
        "Row": df["Row"],
        "Paper top-1 (ImageNet)": df["Paper"].map(_fmt),
        f"Reproduced top-1 ({preset})": [PENDING if s == 0 else _fmt(v) + (f" ± {ci:.2f}" if ci else "")
                                         for v, ci, s in zip(df["Reproduced"], df["± 95% CI"], df["Seeds"])],
        "Paper Δ": df["Paper Δ"].map(lambda v: _fmt(v, True)),
        "Reproduced Δ": df["Reproduced Δ"].map(lambda v: _fmt(v, True)),
        "Seeds": df["Seeds"],
        "MLflow run": df["MLflow runs"],
        "Commit": df["Commit"],
        "Config hash": df["Config"],
    })
    src = table.source
    head = (f"## {table.caption}\n\nSource: {src.get('file', src['paper'])}, Table {src['table']}. "
            f"Preset: `{preset}` (paper values are ImageNet top-1; reproduced values are on this preset's data, "
            "so compare the Δ columns). Δ is relative to the first row.\n\n")
    return head + shown.to_markdown(index=False, disable_numparse=True) + "\n"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def delta_figure(table: Table, df: pd.DataFrame, path: Path, preset: str) -> None:
    """Bars of each row's Δ to the first row: paper (ImageNet) next to reproduced (this preset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(df["Row"])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 3.6))
    paper = [0.0 if i == 0 else (v if v is not None and not pd.isna(v) else 0) for i, v in enumerate(df["Paper Δ"])]
    repro = [0.0 if i == 0 else (v if v is not None and not pd.isna(v) else 0) for i, v in enumerate(df["Reproduced Δ"])]
    ax.bar([i - 0.2 for i in x], paper, 0.4, label="paper (ImageNet)", color="#4c72b0")
    bars = ax.bar([i + 0.2 for i in x], repro, 0.4, label=f"reproduced ({preset})", color="#dd8452")
    for b, s in zip(bars, df["Seeds"]):
        if s == 0:
            ax.annotate(PENDING, (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=8, rotation=90)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"top-1 Δ to '{labels[0]}' (points)")
    ax.set_title(table.caption, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def curves_figure(rows: list[str], layout: Layout, path: Path) -> bool:
    """Validation top-1 per epoch for each row that has run (mean over seeds). False if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for row in rows:
        m = load_row_metrics(layout, row)
        if not m or not m.get("curves"):
            continue
        for ax, key in zip(axes, ("val_top1", "ema_val_top1")):
            curves = [c[key] for c in m["curves"] if c.get(key) and None not in c[key]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{row} (n={len(curves)})")
            drawn = True
    for ax, title in zip(axes, ("model", "EMA model")):
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"{title}, preset {layout.preset}", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return drawn


def dense_label_table(layout: Layout) -> str | None:
    """Markdown table of the annotator's accuracy (image-level and dense, per split), if measured."""
    ann, maps = layout.metrics_dir / "annotator.json", layout.metrics_dir / "scoremaps.json"
    if not maps.is_file():
        return None
    m = json.loads(maps.read_text())
    a = json.loads(ann.read_text()) if ann.is_file() else {}
    rows = []
    for split in ("train", "val"):
        if f"{split}_dense_acc" in m:
            rows.append({"split": split, "dense-label accuracy (%)": m[f"{split}_dense_acc"],
                         "on primary-digit pixels": m[f"{split}_dense_acc_primary"],
                         "on secondary-digit pixels": m[f"{split}_dense_acc_secondary"]})
    head = (f"Annotator image-level val top-1: {a.get('val_top1', '—')}% ({a.get('epochs', '—')} epochs, "
            f"{a.get('train_time_s', '—')} s). Score maps: grid {m.get('grid')}, {m.get('bytes_per_image')} bytes/image.\n\n")
    return head + (pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f") if rows else "") + "\n"
