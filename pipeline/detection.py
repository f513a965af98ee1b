"""Stage `detection` (TL-Align Table 4's analogue): every seed's checkpoint of the table's rows the preset trains (or
every trained row, `detection.rows: all`) as the backbone of Mask R-CNN, fine-tuned on the canvases' digits as
objects; writes metrics/<preset>/detection.json (reports/<preset>/tlalign_table4.md)."""
from __future__ import annotations

import argparse
import datetime as dt
import logging

from pipeline import run_stage
from tlvit.config import load_params, pipeline_rows, preset_section
from tlvit.detection import fine_tune_rows
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit
from tlvit.tables import DETECTION_TABLE, load_column_table
from tlvit.transfer import finished_seeds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s detection: %(message)s")
    params = load_params(args.params)
    sections = preset_section(params, params_path=args.params)
    layout = Layout(params["preset"])
    record = fine_tune_rows(layout, list(pipeline_rows(params)), load_column_table(DETECTION_TABLE),
                            sections["detection"], lambda row: finished_seeds(layout, row), sections["data"],
                            params_path=args.params)
    path = layout.metrics_dir / "detection.json"
    write_json(path, {"preset": params["preset"], "commit": git_commit(), "date": dt.date.today().isoformat(),
                      **record})
    n = sum(len(r["seeds"]) for r in record["rows"])
    print(f"detection: {n} fine-tune(s) of {len(record['rows'])} row(s) on {record['dataset']}"
          + ("" if record["present"] else " (not run here)") + f" ({path})")


if __name__ == "__main__":
    run_stage(main)
