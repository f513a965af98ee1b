"""Stage `transfer` (TL-Align Table 5): every seed's checkpoint of the rows the preset trains (those of the table,
or all of them with `transfer.rows: all`) fine-tuned on each downstream task (`transfer.tasks`); writes
metrics/<preset>/transfer.json (reports/<preset>/tlalign_table5.md)."""
from __future__ import annotations

import argparse
import datetime as dt
import logging

from pipeline import run_stage
from tlvit.config import load_params, pipeline_rows, preset_section
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit
from tlvit.tables import TRANSFER_TABLE, load_column_table
from tlvit.transfer import fine_tune_rows, finished_seeds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    # the fine-tunes log their epochs like training does: the prefix says which stage trains here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s transfer: %(message)s")
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["transfer"]
    layout = Layout(params["preset"])
    rows = fine_tune_rows(layout, list(pipeline_rows(params)), load_column_table(TRANSFER_TABLE), section,
                          lambda row: finished_seeds(layout, row), params_path=args.params)
    path = layout.metrics_dir / "transfer.json"
    write_json(path, {"preset": params["preset"], "commit": git_commit(), "date": dt.date.today().isoformat(),
                      "rows": rows})
    print(f"transfer: {sum(len(r['seeds']) for r in rows)} fine-tune(s) of {len({r['row'] for r in rows})} row(s) "
          f"on {len({r['task'] for r in rows})} task(s) ({path})")


if __name__ == "__main__":
    run_stage(main)
