"""The deviations table: each registered deviation that changes training, measured as a paired row pair.

For every entry of `tlvit.deviations.DEVIATIONS` with `rows` (the row with the original code's behaviour,
the row with the other), the per-seed top-1 of both rows of this preset, the paired difference
other - original with its 95% CI (same seed = same init, data order and augmentation draws), and
Welch's unpaired interval beside it. A row not run (or run for an older config) shows as pending/stale.
"""
from __future__ import annotations

import pandas as pd

from tlvit.deviations import DEVIATIONS
from tlvit.report.results import DONE, Results
from tlvit.report.stats import ci95, diff_ci95, paired_diff_ci95

MIN_PAIRS = 3  # the table's verdict needs this many paired seeds


def _by_seed(results: Results, row: str) -> dict[int, float] | None:
    r = results.get(row)
    return {run["seed"]: run["top1"] for run in r.runs if run.get("top1") is not None} if r.done else None


def _mean_cell(values: dict | None, status: str) -> str:
    if values is None:
        return status
    v = list(values.values())
    half = ci95(v)
    return f"{sum(v) / len(v):.2f}" + (f" ± {half:.2f}" if half is not None else "")


def deviations_frame(results: Results) -> pd.DataFrame:
    """One line per measured deviation (columns as in the Markdown, plus the raw numbers for the CSV)."""
    lines = []
    for d in DEVIATIONS:
        if not d.changes_training:
            continue
        orig_row, other_row = d.rows
        a, b = _by_seed(results, other_row), _by_seed(results, orig_row)
        delta = half = welch = None
        pairs = 0
        if a is not None and b is not None:
            delta, half, pairs = paired_diff_ci95(a, b)
            _, welch = diff_ci95(list(a.values()), list(b.values())) if a and b else (None, None)
        if delta is None:
            verdict = "pending"
        elif pairs < MIN_PAIRS or half is None:
            verdict = f"inconclusive ({pairs} paired seeds < {MIN_PAIRS})"
        elif abs(delta) > half:
            verdict = "the switch changes top-1 (paired CI excludes 0)"
        else:
            verdict = "no difference detected (paired CI includes 0)"
        lines.append({
            "deviation": d.key, "switch": d.switch, "original value": str(d.original_value),
            "other value": str(d.other_value), "default": d.default,
            "original row": orig_row, "other row": other_row,
            "original top-1": _mean_cell(b, results.get(orig_row).status),
            "other top-1": _mean_cell(a, results.get(other_row).status),
            "paired Δ (other - original)": delta, "paired CI95": half, "pairs": pairs, "Welch CI95": welch,
            "verdict": verdict,
        })
    return pd.DataFrame(lines)


def render_deviations(df: pd.DataFrame, preset: str) -> str:
    def num(v, sign=False):
        return "—" if v is None or pd.isna(v) else (f"{v:+.2f}" if sign else f"{v:.2f}")

    shown = pd.DataFrame({
        "Deviation": df["deviation"].map(lambda k: f"`{k}`"),
        "Switch: original / other": [f"`{s}`: `{o}` / `{t}`" for s, o, t in
                                     zip(df["switch"], df["original value"], df["other value"])],
        "Default": df["default"],
        "Original top-1": [f"{v} (`{r}`)" for v, r in zip(df["original top-1"], df["original row"])],
        "Other top-1": [f"{v} (`{r}`)" for v, r in zip(df["other top-1"], df["other row"])],
        "Paired Δ ± CI95": [num(d, True) + ("" if h is None or pd.isna(h) else f" ± {h:.2f}")
                            for d, h in zip(df["paired Δ (other - original)"], df["paired CI95"])],
        "Pairs": df["pairs"],
        "Welch CI95": df["Welch CI95"].map(num),
        "Verdict": df["verdict"],
    })
    head = (f"## Deviations from the authors' code, measured (preset `{preset}`)\n\n"
            "Each line is one switch of `tlvit/deviations.py` (`docs/deviations.md`): a row with the original code's "
            "behaviour and the same row with only that switch flipped. Top-1 is the mean over seeds ± its 95% CI; "
            "the paired Δ is the mean over seeds of (other − original) with the same seed on both sides (same init, "
            "data order and augmentation draws), ± the 95% CI of those differences; Welch's unpaired half-width "
            "is shown beside it. Per-seed values and run ids: the rows' tables' CSVs and `metrics/<preset>/rows/`.\n\n")
    return head + shown.to_markdown(index=False, disable_numparse=True) + "\n"


def render_recipe_conflicts(preset: str) -> str:
    """The ImageNet recipe conflicts (a paper's text vs the authors' command): both values and the choice."""
    lines = [{"Deviation": f"`{d.key}`", "Setting": d.topic, "Authors' code": d.original, "Paper": d.other,
              "Switch: code / paper": f"`{d.switch}`: `{d.original_value}` / `{d.other_value}`",
              "Chosen": "code" if d.default == "original" else "paper", "Why": d.why, "Row (imagenet)": f"`{d.recipe_row}`"}
             for d in DEVIATIONS if d.recipe_row]
    if not lines:
        return ""
    scope = "" if preset == "imagenet" else f" They shape the `imagenet` preset's rows only, not this preset's (`{preset}`)."
    return ("\n## ImageNet recipe conflicts: the papers' text vs the authors' commands\n\n"
            "Settings where a paper and the authors' command for the same model disagree; each is one switch of the "
            "registry, the chosen value is in the row's resolved config (`experiments/authors_recipes.yaml` has every "
            "value of the authors' recipes with its source)." + scope + "\n\n"
            + pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True) + "\n")
