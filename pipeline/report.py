"""Stage `report`: regenerate reports/<preset>/ (tables as Markdown/CSV/LaTeX with claim verdicts, figures, an index)."""
from __future__ import annotations

import argparse
import logging

from pipeline import run_stage
from tlvit.config import load_params
from tlvit.provenance import git_commit
from tlvit.report import build_report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tables", default="experiments/tables")
    ap.add_argument("--rows", default="experiments/rows.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    index = build_report(params, tables_dir=args.tables, rows_path=args.rows, params_path=args.params, commit=git_commit())
    print(f"report: {index.resolve()}")


if __name__ == "__main__":
    run_stage(main)
