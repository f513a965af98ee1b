"""TL-Align Table 4 as measured by stage `detection`: paper next to reproduced box and mask AP, and each + TL-Align
row's paired Δ over seeds against its model's row (reports/<preset>/tlalign_table4.md)."""
from __future__ import annotations

from tlvit.report.paired_columns import paired_column_lines

HEADERS = {"ap_box": "AP box", "ap50_box": "AP50 box", "ap75_box": "AP75 box", "ap_mask": "AP mask",
           "ap50_mask": "AP50 mask", "ap75_mask": "AP75 mask"}


def _per_seed(entry: dict | None, column: str) -> dict[int, float]:
    return {s["seed"]: s[column] for s in (entry or {}).get("seeds", []) if s.get(column) is not None}


def render(table: dict, record: dict) -> str:
    """Markdown: one line per table row (paper | reproduced per metric), then the paired Δ of each `vs` pair."""
    by_row = {r["row"]: r for r in record["rows"]}
    present = {c: record["present"] for c in table["columns"]}
    lines = [f"## TL-Align Table 4: object detection and instance segmentation (preset `{record['preset']}`)", "",
             "Source: Xiao et al., \"Token-Label Alignment for Vision Transformers\", ICCV 2023, arXiv:2210.06455, "
             f"Table 4. Stage `detection` at commit `{str(record.get('commit'))[:12]}` on {record.get('date')}: each "
             "seed's checkpoint as the backbone of torchvision's Mask R-CNN (params.yaml `detection`), COCO-style AP "
             "(percent, pycocotools' evaluation) on the val split, means over seeds. Paper values are Cascade Mask "
             "R-CNN on COCO 2017 val (3x schedule), which is a cluster recipe with the Swin authors' code "
             "(docs/recipes.md); the embedded presets detect the canvases' digits (10 classes). *not present*: not "
             "run by this stage (COCO); —: the row was not trained.", ""]
    lines += paired_column_lines(table, by_row, list(table["columns"]), HEADERS, present, _per_seed,
                                 "Paired Δ (row − its model's row) over common seeds, 95% CI.")
    return "\n".join(lines) + "\n"
