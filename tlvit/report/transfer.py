"""TL-Align Table 5 as measured by stage `transfer`: paper next to reproduced top-1 per downstream set, and each
+ TL-Align row's paired Δ over seeds against its model's row (reports/<preset>/tlalign_table5.md)."""
from __future__ import annotations

from tlvit.report.paired_columns import paired_column_lines

HEADERS = {"c10": "CIFAR-10", "c100": "CIFAR-100", "flowers": "Flowers", "cars": "Cars", "digits": "digits"}
TASK_KEY = {"c10": "cifar10", "c100": "cifar100"}  # the table's column -> the stage's task name, where they differ


def by_row(record: dict) -> dict[str, dict]:
    """The stage's (row, task) records as row -> {"seeds": [{seed, <task>: top-1, ...}], "present": {task: bool}}."""
    out: dict[str, dict] = {}
    for r in record["rows"]:
        entry = out.setdefault(r["row"], {"seeds": [], "present": {}})
        entry["present"][r["task"]] = r["present"]
        for s in r["seeds"]:
            seed = next((x for x in entry["seeds"] if x["seed"] == s["seed"]), None)
            if seed is None:
                seed = {"seed": s["seed"]}
                entry["seeds"].append(seed)
            seed[r["task"]] = s["top1"]
    return out


def _per_seed(entry: dict | None, column: str) -> dict[int, float]:
    task = TASK_KEY.get(column, column)
    return {s["seed"]: s[task] for s in (entry or {}).get("seeds", []) if s.get(task) is not None}


def render(table: dict, record: dict) -> str:
    """Markdown: one line per table row (paper | reproduced per set), then the paired Δ of each `vs` pair. The
    columns are the table's sets plus any task the preset measured that the paper has not (embedded: `digits`)."""
    rows = by_row(record)
    tasks = list(dict.fromkeys(r["task"] for r in record["rows"]))
    columns = list(table["columns"]) + [t for t in tasks if t not in {TASK_KEY.get(c, c) for c in table["columns"]}]
    present = {c: any(e["present"].get(TASK_KEY.get(c, c), False) for e in rows.values()) for c in columns}
    lines = [f"## TL-Align Table 5: transfer learning (preset `{record['preset']}`)", "",
             "Source: Xiao et al., \"Token-Label Alignment for Vision Transformers\", ICCV 2023, arXiv:2210.06455, "
             f"Table 5. Stage `transfer` at commit `{str(record.get('commit'))[:12]}` on {record.get('date')}: each "
             "seed's checkpoint fine-tuned with one recipe (`transfer.train` in params.yaml; a new classifier, no "
             "TL-Align while fine-tuning), top-1 on the set's evaluation split, means over seeds. Paper values are "
             "ImageNet-pretrained DeiTs on CIFAR-10/100, Flowers-102 and Stanford Cars; *not present*: the set is not "
             "on disk (or not a task of this preset); —: the row was not trained.", ""]
    lines += paired_column_lines(table, rows, columns, HEADERS, present, _per_seed,
                                 "Paired Δ (row − its model's row) over common seeds, 95% CI.")
    return "\n".join(lines) + "\n"
