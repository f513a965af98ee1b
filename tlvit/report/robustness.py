"""TL-Align Table 6 as measured by stage `robustness`: paper next to reproduced per column, and each + TL-Align row's
paired Δ over seeds against its model's row (reports/<preset>/tlalign_table6.md)."""
from __future__ import annotations

from tlvit.report.paired_columns import paired_column_lines

HEADERS = {"top1": "top-1", "v2": "V2", "a": "A", "c": "C ↓", "r": "R", "autoattack": "AutoAttack"}
MEASURED_KEY = {"top1": "val"}  # the stage's key for a column, where it differs


def _per_seed(entry: dict | None, column: str) -> dict[int, float]:
    key = MEASURED_KEY.get(column, column)
    return {s["seed"]: s[key] for s in (entry or {}).get("seeds", []) if s.get(key) is not None}


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
    lines += paired_column_lines(
        table, by_row, columns, HEADERS, present, _per_seed,
        "Paired Δ (row − its model's row) over common seeds, 95% CI; for C lower is better, so a negative Δ is the "
        "paper's direction.")
    return "\n".join(lines) + "\n"
