"""A paper table as data frames (one line per paper row, one per claimed difference) and as Markdown."""
from __future__ import annotations

import math
import statistics

import pandas as pd

from tlvit.report.results import DONE, PENDING, STALE, Results
from tlvit.report.stats import ci95, diff_ci95, verdict
from tlvit.tables import CITATIONS, Table



def short_commit(commit: str | None) -> str:
    """12 hex digits of a commit, keeping its `-dirty` mark (a run from uncommitted code must say so)."""
    if not commit:
        return "unknown"
    head, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
    return head[:12] + ("-dirty" if dirty else "")

def _mean(values: list[float] | None) -> float | None:
    return statistics.fmean(values) if values else None


def table_frame(table: Table, results: Results) -> pd.DataFrame:
    """One line per paper row: paper value, reproduced mean (± 95% CI), Δ to the table's first row, provenance.

    Rows that did not run (or whose metrics belong to an older config) carry no number: Reproduced is None
    and Status says why.
    """
    lines = []
    base_paper = base_repro = None
    top5 = any(r.get("paper_top5") is not None for r in table.rows)
    for i, r in enumerate(table.rows):
        res = results.get(r["row"])
        values = res.values(table.metric) or []
        repro = _mean(values)
        if i == 0:
            base_paper, base_repro = r.get("paper"), repro
        runs = res.runs if res.done else []
        line = {
            "Row": r["label"],
            "Paper": r.get("paper"),
            "Reproduced": repro,
            "± 95% CI": ci95(values),
            "Paper Δ": None if i == 0 or r.get("paper") is None or base_paper is None else r["paper"] - base_paper,
            "Reproduced Δ": None if i == 0 or repro is None or base_repro is None else repro - base_repro,
            "Seeds": len(values),
            "MLflow runs": ", ".join(run.get("mlflow_run_id") or "-" for run in runs) if runs else res.status,
            "Commit": ", ".join(sorted({short_commit(run.get("git_commit")) for run in runs})) if runs else res.status,
            "Config": res.expected_hash or (res.metrics or {}).get("config_hash") or "—",
            "Status": res.status,
            "Params (M)": results.params_m(r["row"]),
            "Paper params (M)": r.get("params_m"),
            "Note": res.note,
            "row_id": r["row"],
        }
        if top5:
            line["Paper top-5"] = r.get("paper_top5")
            line["Reproduced top-5"] = _mean(res.values("top5"))
        lines.append(line)
    return pd.DataFrame(lines)


def claims_frame(table: Table, results: Results) -> pd.DataFrame:
    """One line per claimed difference: paper Δ, reproduced Δ with its 95% CI (Welch), seeds, verdict."""
    lines = []
    for c in table.claims():
        a, b = results.get(c.row), results.get(c.vs)
        va, vb = a.values(table.metric), b.values(table.metric)
        delta = half = None
        if va and vb:
            delta, half = diff_ci95(va, vb)
        v = verdict(c.paper_delta, va, vb)
        lines.append({
            "Claim": f"{c.label} vs {c.vs_label}", "Paper Δ": c.paper_delta, "Reproduced Δ": delta, "CI half-width": half,
            "Seeds": f"{len(va or [])} / {len(vb or [])}", "Verdict": v.text, "kind": v.kind, "Note": c.note,
            "row_id": c.row, "vs_id": c.vs,
        })
    return pd.DataFrame(lines, columns=["Claim", "Paper Δ", "Reproduced Δ", "CI half-width", "Seeds", "Verdict", "kind",
                                        "Note", "row_id", "vs_id"])


def _fmt(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _reproduced_cell(row: pd.Series) -> str:
    if row["Status"] == PENDING:
        return PENDING
    if row["Status"] == STALE:
        return "stale (re-run)"
    ci = row["± 95% CI"]
    return _fmt(row["Reproduced"]) + (f" ± {ci:.2f}" if ci is not None and not pd.isna(ci) else "")


def _params_cell(v) -> str:
    if v is None or pd.isna(v):
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def render_markdown(table: Table, df: pd.DataFrame, preset: str, claims: pd.DataFrame | None = None) -> str:
    """The table (paper vs reproduced, provenance) and, when given, its claimed differences with verdicts."""
    shown = pd.DataFrame({
        "Row": df["Row"],
        "Paper top-1 (ImageNet)": df["Paper"].map(_fmt),
        f"Reproduced top-1 ({preset})": df.apply(_reproduced_cell, axis=1),
        "Paper Δ": df["Paper Δ"].map(lambda v: _fmt(v, True)),
        "Reproduced Δ": df["Reproduced Δ"].map(lambda v: _fmt(v, True)),
        "Seeds": df["Seeds"],
        "Commit": df["Commit"],
        "Params (M, built)": df["Params (M)"].map(_params_cell),
        "Paper params (M)": df["Paper params (M)"].map(lambda v: "—" if v is None or pd.isna(v) else f"{v:g}"),
    })
    if "Paper top-5" in df:
        shown["Paper top-5"] = df["Paper top-5"].map(_fmt)
        shown["Reproduced top-5"] = [PENDING if s != DONE else _fmt(v) for v, s in zip(df["Reproduced top-5"], df["Status"])]
    src = table.source
    head = (f"## {table.caption}\n\nSource: {CITATIONS.get(src['paper'], src['paper'])}, Table {src['table']}. "
            f"Preset: `{preset}` (paper values are ImageNet top-1; reproduced values are on this preset's data, "
            "so compare the Δ columns). Δ is relative to the first row. Params: counted from the model as built "
            "for this preset (incl. the token-labeling aux head where the row has one). Each seed's MLflow run, "
            "commit and config hash: this table's CSV and `provenance.csv`.\n\n")
    text = head + shown.to_markdown(index=False, disable_numparse=True) + "\n"
    notes = [f"- {label}: {note}" for label, note in zip(df["Row"], df["Note"]) if note]
    if notes:
        text += "\nNotes:\n" + "\n".join(notes) + "\n"
    if claims is not None and len(claims):
        text += "\n" + render_claims(claims)
    return text


def ci_text(delta, half) -> str:
    """`+d [lo, hi]` of a difference and its 95% CI half-width; `+d` without a half-width, — without a Δ."""
    if delta is None or pd.isna(delta):
        return "—"
    return _fmt(delta, True) + ("" if half is None or pd.isna(half) else f" [{delta - half:+.2f}, {delta + half:+.2f}]")


def render_claims(claims: pd.DataFrame) -> str:
    """Markdown of the claimed differences and a one-line tally of the verdicts."""
    def ci_cell(row) -> str:
        if (row["Reproduced Δ"] is None or pd.isna(row["Reproduced Δ"])) and row["kind"] == "pending":
            return PENDING
        return ci_text(row["Reproduced Δ"], row["CI half-width"])

    shown = pd.DataFrame({
        "Claimed difference": [c + (f" ({n})" if n else "") for c, n in zip(claims["Claim"], claims["Note"])],
        "Paper Δ": claims["Paper Δ"].map(lambda v: _fmt(v, True)),
        "Reproduced Δ [95% CI]": claims.apply(ci_cell, axis=1),
        "Seeds": claims["Seeds"],
        "Verdict": claims["Verdict"],
    })
    tally = claims["kind"].value_counts()
    summary = ", ".join(f"{tally[k]} {k.replace('_', ' ')}" for k in
                        ("reproduced", "consistent", "not_reproduced", "inconclusive", "pending") if k in tally)
    return ("### Claimed differences\n\nEach row against the row the paper compares it with; the reproduced Δ's "
            "95% CI is Welch's over seeds. Verdict: *reproduced at this scale* when the reproduced Δ has the paper's "
            "sign and its CI excludes 0.\n\n" + shown.to_markdown(index=False, disable_numparse=True)
            + f"\n\nVerdicts: {summary}.\n")


def provenance_frame(results: Results, rows: list[str]) -> pd.DataFrame:
    """One line per seed of every row: where its number comes from (MLflow run, commit, config hash)."""
    lines = []
    for row in dict.fromkeys(rows):
        res = results.get(row)
        for run in res.runs if res.status != PENDING else []:
            lines.append({"row": row, "status": res.status, "metrics_of": res.source_row, "seed": run.get("seed"),
                          "top1": run.get("top1"), "mlflow_run_id": run.get("mlflow_run_id"),
                          "commit": run.get("git_commit"), "config_hash": (res.metrics or {}).get("config_hash"),
                          "current_config_hash": res.expected_hash})
    return pd.DataFrame(lines, columns=["row", "status", "metrics_of", "seed", "top1", "mlflow_run_id", "commit",
                                        "config_hash", "current_config_hash"])
