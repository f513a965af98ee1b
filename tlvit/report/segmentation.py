"""The segmentation tables as measured by stage `segmentation` (LV-ViT slides Tables 5-6, TL-Align Table 3): paper
next to reproduced per metric, and each pair's paired Δ over seeds (reports/<preset>/<table>.md)."""
from __future__ import annotations

from tlvit.report.paired_columns import paired_column_lines

HEADERS = {"miou": "mIoU", "pacc": "pixel acc.", "macc": "mAcc", "miou_ms": "mIoU (MS)", "pacc_ms": "pixel acc. (MS)",
           "macc_ms": "mAcc (MS)"}
TITLES = {"lvvit_slides_table5": ("LV-ViT slides Table 5: token labeling and semantic segmentation",
                                  'Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision '
                                  'Transformers", NeurIPS 2021, arXiv:2104.10858 (the authors\' slides), Table 5'),
          "lvvit_slides_table6": ("LV-ViT slides Table 6: segmentation backbones compared",
                                  'Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision '
                                  'Transformers", NeurIPS 2021, arXiv:2104.10858 (the authors\' slides), Table 6'),
          "tlalign_table3": ("TL-Align Table 3: semantic segmentation",
                             'Xiao et al., "Token-Label Alignment for Vision Transformers", ICCV 2023, '
                             'arXiv:2210.06455, Table 3')}


def _key(row: str, head: str) -> str:
    return f"{row}+{head}"


def keyed(table: dict) -> dict:
    """The table with each entry named row+head (its pair: the other row, same head), for the paired renderer."""
    rows = [dict(r, row=_key(r["row"], r["head"]), **({"vs": _key(r["vs"], r["head"])} if r.get("vs") else {}))
            for r in table["rows"]]
    return dict(table, rows=rows)


def _per_seed(entry: dict | None, column: str) -> dict[int, float]:
    return {s["seed"]: s[column] for s in (entry or {}).get("seeds", []) if s.get(column) is not None}


def render(key: str, table: dict, record: dict) -> str:
    """Markdown: one line per table entry (paper | reproduced per metric), then the paired Δ of each `vs` pair."""
    title, source = TITLES[key]
    wanted = {_key(r["row"], r["head"]) for r in table["rows"]}
    by_row = {_key(r["row"], r["head"]): r for r in record["runs"] if _key(r["row"], r["head"]) in wanted}
    present = {c: record["present"] for c in table["columns"]}
    lines = [f"## {title} (preset `{record['preset']}`)", "",
             f"Source: {source}. Stage `segmentation` at commit `{str(record.get('commit'))[:12]}` on "
             f"{record.get('date')}: each seed's checkpoint fine-tuned with the decode head the row names and one "
             f"recipe (params.yaml `segmentation`), scored on the `{record['dataset']}` val split (percent, means over "
             "seeds; MS: multi-scale). Paper values are ADE20K's (150 classes); the embedded presets segment the "
             "canvases (10 digits and the background). —: the row was not trained; *not present*: the set is not on "
             "disk.", ""]
    lines += paired_column_lines(keyed(table), by_row, list(table["columns"]), HEADERS, present, _per_seed,
                                 "Paired Δ (row − its model's row, same head) over common seeds, 95% CI.")
    return "\n".join(lines) + "\n"
