"""Stage `report`: regenerate reports/<preset>/ (tables as Markdown/CSV/LaTeX with claim verdicts, figures, an index)."""
from __future__ import annotations

import argparse
import logging

from pipeline import run_stage
from tlvit.config import load_params
from tlvit.provenance import git_commit
from tlvit.layout import Layout
from tlvit.report import build_report
from tlvit.report.results import Results
from tlvit.report.table_experiments import mirror_table_runs
from tlvit.tables import load_tables


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
    try:  # MLflow is an external store: the report stands without it
        results = Results(Layout(params["preset"]), params, args.rows, args.params)
        copied, why = mirror_table_runs(results, load_tables(args.tables))
        print(f"report: {why}" if why else f"report: MLflow: each table's experiment holds all its rows ({copied} copies of "
                                           "runs from their rows' first tables)")
    except Exception as e:  # noqa: BLE001  a store that fails mid-way must not fail the report
        print(f"report: MLflow: the tables' experiments were not completed ({type(e).__name__}: {e})")


if __name__ == "__main__":
    run_stage(main)
