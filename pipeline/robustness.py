"""Stage `robustness` (TL-Align Table 6): every seed's checkpoint of the rows the preset trains (those of the table,
or all of them with `robustness.rows: all`) on ImageNet-V2, -A, -C and -R and under AutoAttack, or on the embedded
analogues the data stage builds; writes metrics/<preset>/robustness.json (reports/<preset>/tlalign_table6.md)."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
from pathlib import Path

from pipeline import run_stage
from tlvit.config import load_params, pipeline_rows, preset_section
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit
from tlvit.robustness import measure_rows
from tlvit.tables import ROBUSTNESS_TABLE, load_column_table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = load_params(args.params)
    sections = preset_section(params, params_path=args.params)
    layout = Layout(params["preset"])
    table = load_column_table(ROBUSTNESS_TABLE)
    rows = measure_rows(layout, list(pipeline_rows(params)), table, sections["robustness"], params_path=args.params)
    write_json(layout.metrics_dir / "robustness.json", {"preset": params["preset"], "commit": git_commit(),
                                                         "date": dt.date.today().isoformat(), "rows": rows})
    print(f"robustness: {sum(len(r['seeds']) for r in rows)} checkpoint(s) of {len(rows)} row(s) measured "
          f"({Path(layout.metrics_dir / 'robustness.json')})")


if __name__ == "__main__":
    run_stage(main)
