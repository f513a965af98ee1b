"""Figures of the tables: Δ bars, the ablation path, model scaling (Fig. 1 style) and training curves.

Rows that have not run are drawn as "pending" (a label, never a bar of height 0 that reads as a result).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlvit.io import atomic_path
from tlvit.report.curves import KEYS, RowCurves, row_curves
from tlvit.report.results import DONE, Results
from tlvit.tables import Table

PAPER_C, REPRO_C = "#4c72b0", "#dd8452"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Write a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _plt().close(fig)


def _num(v) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def delta_figure(table: Table, df: pd.DataFrame, path: Path, preset: str) -> None:
    """Bars of each row's Δ to the first row: paper (ImageNet) next to reproduced (this preset)."""
    plt = _plt()
    labels = list(df["Row"])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 3.6))
    paper = [0.0 if i == 0 else (_num(v) or 0.0) for i, v in enumerate(df["Paper Δ"])]
    repro = [0.0 if i == 0 else (_num(v) or 0.0) for i, v in enumerate(df["Reproduced Δ"])]
    ax.bar([i - 0.2 for i in x], paper, 0.4, label="paper (ImageNet)", color=PAPER_C)
    bars = ax.bar([i + 0.2 for i in x], repro, 0.4, label=f"reproduced ({preset})", color=REPRO_C)
    for b, status, s in zip(bars, df["Status"], df["Seeds"]):
        if status != DONE or s == 0:
            ax.annotate(status, (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=8, rotation=90)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"top-1 Δ to '{labels[0]}' (points)")
    ax.set_title(table.caption, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def path_figure(table: Table, df: pd.DataFrame, results: Results, path: Path, preset: str) -> None:
    """The ablation path as two bar panels: paper top-1 (ImageNet) and reproduced top-1 ± 95% CI with seeds."""
    plt = _plt()
    n = len(df)
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(max(9, 1.5 * n), 4.2), sharex=True)
    x = list(range(n))
    paper = [_num(v) for v in df["Paper"]]
    ax_p.bar(x, [v or 0 for v in paper], color=PAPER_C)
    for i, v in enumerate(paper):
        if v is not None:
            ax_p.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=7)
    _zoom(ax_p, [v for v in paper if v is not None])
    ax_p.set_title("paper (ImageNet top-1)", fontsize=9)
    done = [i for i in x if df["Status"][i] == DONE]
    means = [_num(df["Reproduced"][i]) for i in done]
    cis = [_num(df["± 95% CI"][i]) or 0.0 for i in done]
    ax_r.bar(done, means, color=REPRO_C, yerr=cis, capsize=3)
    seeds_all = []
    for i in done:
        seeds = results.get(df["row_id"][i]).values(table.metric) or []
        seeds_all += seeds
        ax_r.scatter([i] * len(seeds), seeds, color="black", s=8, zorder=3)
    _zoom(ax_r, means + seeds_all + [m + c for m, c in zip(means, cis)] + [m - c for m, c in zip(means, cis)])
    lo = ax_r.get_ylim()[0]
    for i in x:
        if df["Status"][i] != DONE:
            ax_r.annotate(df["Status"][i], (i, lo), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                          fontsize=8, rotation=90, color="grey")
    ax_r.set_title(f"reproduced ({preset} top-1, mean ± 95% CI, dots = seeds)", fontsize=9)
    for ax in (ax_p, ax_r):
        ax.set_xticks(x, list(df["Row"]), rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(table.caption, fontsize=10)
    fig.tight_layout()
    save(fig, path)


def _zoom(ax, values: list[float]) -> None:
    """Bars of accuracies differ by a few points: start the axis just below the smallest value."""
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - 3 * pad), min(100.0, hi + pad))


def scaling_figure(tables: list[Table], results: Results, path: Path, preset: str) -> bool:
    """Params vs top-1 per model family (rows with a `series`), paper and reproduced side by side (Fig. 1 style).

    Paper params are the papers' (`params_m`); reproduced params are counted from the models as built for
    this preset. False when no table row has a series.
    """
    series: dict[str, list[tuple[str, dict]]] = {}
    for t in tables:
        for r in t.rows:
            if r.get("series"):
                series.setdefault(r["series"], []).append((t.key, r))
    if not series:
        return False
    plt = _plt()
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^v<>"
    not_run = []
    for k, (name, rows) in enumerate(series.items()):
        pts = sorted((r["params_m"], r["paper"], r["label"]) for _, r in rows if r.get("params_m") and r.get("paper"))
        if pts:
            ax_p.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % 7], label=name)
            for p in pts:
                ax_p.annotate(p[2].split(" (")[0], (p[0], p[1]), fontsize=6, xytext=(3, -8), textcoords="offset points")
        done, pending = [], []
        for _, r in rows:
            res, pm = results.get(r["row"]), results.params_m(r["row"])
            if pm is None:
                continue
            vals = res.values("top1")
            if vals:
                from tlvit.report.stats import ci95

                done.append((pm, sum(vals) / len(vals), ci95(vals) or 0.0, r["label"]))
            else:
                pending.append((pm, r["label"], res.status))
        if done:
            done.sort()
            ax_r.errorbar([d[0] for d in done], [d[1] for d in done], yerr=[d[2] for d in done], marker=markers[k % 7],
                          capsize=3, label=name)
            for d in done:
                ax_r.annotate(d[3].split(" (")[0], (d[0], d[1]), fontsize=6, xytext=(3, -8), textcoords="offset points")
        not_run += [f"{label.split(' (')[0]} ({pm:.3g}M): {status}" for pm, label, status in pending]
    if not_run:
        ax_r.text(0.99, 0.02, "\n".join(not_run), transform=ax_r.transAxes, ha="right", va="bottom", fontsize=6,
                  color="grey")
    ax_p.set_title("paper (ImageNet top-1 vs params)", fontsize=9)
    ax_r.set_title(f"reproduced ({preset}; params of the built models)", fontsize=9)
    for ax in (ax_p, ax_r):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3, which="both")
        if ax.lines or ax.collections:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    return True


def curves_figure(rows: list[str], results: Results, path: Path, title: str | None = None) -> list[RowCurves]:
    """Validation top-1 (model and EMA) and train loss per epoch, mean over seeds with a min-max band.

    One line per row that has run, labelled with its source (MLflow or the metrics JSON); returns those rows
    (for the index's `sources_note`), empty (and no file) when none has run.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    drawn: dict[str, RowCurves] = {}
    for row in dict.fromkeys(rows):
        rc = row_curves(results, row)
        if rc is None:
            continue
        for ax, key in zip(axes, KEYS):
            c = rc.curves.get(key)
            epochs, mean, lo, hi = c.mean() if c else ([], [], [], [])
            if not epochs:
                continue
            line, = ax.plot(epochs, mean, marker="." if len(epochs) < 12 else None,
                            label=f"{row} (n={len(c.seeds)}, {rc.source})")
            if len(c.seeds) > 1:
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15)
            drawn[row] = rc
    for ax, name in zip(axes, ("val top-1 (%), model", "val top-1 (%), EMA model", "train loss")):
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=6)
    src = " + ".join(sorted({rc.source for rc in drawn.values()})) or "-"
    fig.suptitle(f"{title or 'Training curves'} (preset {results.layout.preset}; mean over seeds, band = min-max; from {src})",
                 fontsize=9)
    disagree = [row for row, rc in drawn.items() if rc.mismatches]
    if disagree:  # in the figure too, not only in the index
        fig.text(0.5, 0.01, f"JSON copy and MLflow disagree for {', '.join(disagree)}: see the report's README.md",
                 ha="center", fontsize=8, color="red")
    fig.tight_layout(rect=(0, 0.04 if disagree else 0, 1, 1))
    if drawn:
        save(fig, path)
    else:
        plt.close(fig)
    return list(drawn.values())
