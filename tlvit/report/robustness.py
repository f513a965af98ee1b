"""TL-Align Table 6 as measured by stage `robustness`: paper next to reproduced per column, and each + TL-Align row's
paired Δ over seeds against its model's row (reports/<preset>/tlalign_table6.md)."""
from __future__ import annotations

import statistics

from tlvit.report.frames import _fmt, ci_text
from tlvit.report.stats import paired_diff_ci95

HEADERS = {"top1": "top-1", "v2": "V2", "a": "A", "c": "C ↓", "r": "R", "autoattack": "AutoAttack"}
MEASURED_KEY = {"top1": "val"}  # the stage's key for a column, where it differs


def _per_seed(entry: dict | None, column: str) -> dict[int, float]:
    key = MEASURED_KEY.get(column, column)
    return {s["seed"]: s[key] for s in (entry or {}).get("seeds", []) if s.get(key) is not None}


def _cell(values: dict[int, float], present: bool) -> str:
    if not present:
        return "not present"
    return _fmt(statistics.fmean(values.values())) if values else "—"


def render(table: dict, record: dict) -> str:
    """Markdown: one line per table row (paper | reproduced per column), then the paired Δ of each `vs` pair."""
    preset = record["preset"]
    by_row = {r["row"]: r for r in record["rows"]}
    columns = table["columns"]
    sets = next((r["sets"] for r in record["rows"]), {})
    present = {c: sets.get(MEASURED_KEY.get(c, c), False) if c != "autoattack" else True for c in columns}
    kinds = {s.get("c_kind") for r in record["rows"] for s in r["seeds"]} - {None}
    c_name = ("ImageNet-C mCE (%, AlexNet = 100)" if kinds == {"mce"} else
              "mean corruption error (%, no AlexNet reference at this scale)" if kinds == {"mean_error"} else "C")
    lines = [f"## TL-Align Table 6: generalisation and robustness (preset `{preset}`)", "",
             "Source: Xiao et al., \"Token-Label Alignment for Vision Transformers\", ICCV 2023, arXiv:2210.06455, "
             f"Table 6. Stage `robustness` at commit `{str(record.get('commit'))[:12]}` on {record.get('date')}. Paper "
             "values are ImageNet's (V2: ImageNet-V2, A: ImageNet-A, R: ImageNet-R, C: ImageNet-C mCE, AutoAttack: "
             f"top-1 under standard AutoAttack, L-inf 4/255); reproduced values are this preset's, means over seeds. "
             f"C here: {c_name}. A row the preset does not train shows —; a set that is not on disk, *not present*.", ""]
    head = ["Row"] + [f"{h} paper / reproduced" for h in (HEADERS[c] for c in columns)] + ["Seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = list(dict.fromkeys([r["row"] for r in table["rows"]] + list(by_row)))
    labels = {r["row"]: r.get("label", r["row"]) for r in table["rows"]}
    paper = {r["row"]: r.get("paper") or {} for r in table["rows"]}
    for row in shown:
        entry = by_row.get(row)
        cells = [f"{_fmt(paper.get(row, {}).get(c))} / {_cell(_per_seed(entry, c), present[c])}" for c in columns]
        lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + f" | {len((entry or {}).get('seeds', []))} |")
    pairs = [(r["row"], r["vs"]) for r in table["rows"] if r.get("vs")]
    lines += ["", "Paired Δ (row − its model's row) over common seeds, 95% CI; for C lower is better, so a negative Δ "
              "is the paper's direction.", "",
              "| Pair | " + " | ".join(f"{HEADERS[c]} paper Δ / reproduced Δ [95% CI]" for c in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for row, vs in pairs:
        cells = []
        for c in columns:
            p_row, p_vs = paper.get(row, {}).get(c), paper.get(vs, {}).get(c)
            p_delta = None if p_row is None or p_vs is None else p_row - p_vs
            delta, half, n = paired_diff_ci95(_per_seed(by_row.get(row), c), _per_seed(by_row.get(vs), c))
            repro = ci_text(delta, half) + (f" (n={n})" if delta is not None and half is None else "")
            cells.append(f"{_fmt(p_delta, True)} / {repro}")
        lines.append(f"| {labels.get(row, row)} vs {labels.get(vs, vs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
