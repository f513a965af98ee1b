"""Stages `train@<row>` and `finetune@<row>`: every seed of one row, then the row's metrics (mean over seeds + provenance)."""
from __future__ import annotations

import argparse
import logging

from pipeline import run_stage
from tlvit.config import check_row_stage, config_hash, load_params, resolve_run_config
from tlvit.launch.launcher import await_launched_row
from tlvit.rows import run_row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--row", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rows", default="experiments/rows.yaml")
    ap.add_argument("--parent", default=None, help="finetune@<row> stages: the parent row (params.yaml `finetunes`)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = load_params(args.params)
    check_row_stage(params, args.row, args.parent, rows_path=args.rows, params_path=args.params)
    # a job `tlvit launch` submitted for this row: wait for it; its complete checkpoints are then only collected
    cfg = resolve_run_config(params, args.row, rows_path=args.rows, params_path=args.params)
    await_launched_row(args.row, config_hash(cfg), params, args.params, args.rows)
    m = run_row(args.row, args.params, args.rows)
    print(f"train@{args.row}: top-1 {m['top1']} over {m['n_seeds']} seed(s)")


if __name__ == "__main__":
    run_stage(main)
