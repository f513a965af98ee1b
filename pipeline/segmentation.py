"""Stage `segmentation` (LV-ViT slides Tables 5-6, TL-Align Table 3): every seed's checkpoint of the tables' rows the
preset trains (or every trained row with each head, `segmentation.rows: all`) fine-tuned with its decode head on the
segmentation set; writes metrics/<preset>/segmentation.json (reports/<preset>/{lvvit_slides_table5,
lvvit_slides_table6,tlalign_table3}.md)."""
from __future__ import annotations

import argparse
import datetime as dt
import logging

from pipeline import run_stage
from tlvit.config import load_params, pipeline_rows, preset_section
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit
from tlvit.segmentation import fine_tune_rows
from tlvit.tables import load_segmentation_tables
from tlvit.transfer import finished_seeds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s segmentation: %(message)s")
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["segmentation"]
    layout = Layout(params["preset"])
    record = fine_tune_rows(layout, list(pipeline_rows(params)), load_segmentation_tables(), section,
                            lambda row: finished_seeds(layout, row), params_path=args.params)
    path = layout.metrics_dir / "segmentation.json"
    write_json(path, {"preset": params["preset"], "commit": git_commit(), "date": dt.date.today().isoformat(),
                      **record})
    n = sum(len(r["seeds"]) for r in record["runs"])
    print(f"segmentation: {n} fine-tune(s) of {len(record['runs'])} (row, head) pair(s) on {record['dataset']}"
          + ("" if record["present"] else " (not present)") + f" ({path})")


if __name__ == "__main__":
    run_stage(main)
