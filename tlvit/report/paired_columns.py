"""A paper table with several measured columns per row (TL-Align Tables 5 and 6): paper next to reproduced per
column, then each `vs` pair's paired Δ over seeds with its 95% CI."""
from __future__ import annotations

import statistics
from typing import Callable

from tlvit.report.frames import _fmt, ci_text
from tlvit.report.stats import paired_diff_ci95

PerSeed = Callable[[dict | None, str], dict[int, float]]  # (a row's record, column) -> {seed: value}


def paired_column_lines(table: dict, by_row: dict, columns: list[str], headers: dict[str, str],
                        present: dict[str, bool], per_seed: PerSeed, pair_note: str) -> list[str]:
    """Markdown lines: one line per table row (and any measured row the table lacks), then one per `vs` pair."""
    head = ["Row"] + [f"{headers[c]} paper / reproduced" for c in columns] + ["Seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = list(dict.fromkeys([r["row"] for r in table["rows"]] + list(by_row)))
    labels = {r["row"]: r.get("label", r["row"]) for r in table["rows"]}
    paper = {r["row"]: r.get("paper") or {} for r in table["rows"]}
    for row in shown:
        entry = by_row.get(row)
        cells = []
        for c in columns:
            values = per_seed(entry, c)
            measured = "not present" if not present[c] else _fmt(statistics.fmean(values.values())) if values else "—"
            cells.append(f"{_fmt(paper.get(row, {}).get(c))} / {measured}")
        lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + f" | {len((entry or {}).get('seeds', []))} |")
    lines += ["", pair_note, "",
              "| Pair | " + " | ".join(f"{headers[c]} paper Δ / reproduced Δ [95% CI]" for c in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for row, vs in ((r["row"], r["vs"]) for r in table["rows"] if r.get("vs")):
        cells = []
        for c in columns:
            p_row, p_vs = paper.get(row, {}).get(c), paper.get(vs, {}).get(c)
            p_delta = None if p_row is None or p_vs is None else p_row - p_vs
            delta, half, n = paired_diff_ci95(per_seed(by_row.get(row), c), per_seed(by_row.get(vs), c))
            repro = ci_text(delta, half) + (f" (n={n})" if delta is not None and half is None else "")
            cells.append(f"{_fmt(p_delta, True)} / {repro}")
        lines.append(f"| {labels.get(row, row)} vs {labels.get(vs, vs)} | " + " | ".join(cells) + " |")
    return lines
