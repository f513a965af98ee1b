"""`tlvit rows`: which training rows fill the papers' tables (for params.yaml `rows` and `finetunes`, which DVC's foreach runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rows", help="list the rows that fill every table (or some tables); optionally write params.yaml `rows`",
                       description="Print the training rows the tables need under a preset (by default the tables its "
                                   "`rows_from` names): each configuration once "
                                   "(two row ids with the same config hash train once), `init_from` parents first. "
                                   "--write puts them into params.yaml `rows:` (trained from scratch) and `finetunes:` "
                                   "(row: parent) so that `dvc repro` trains them all, parents first.")
    p.add_argument("--all", action="store_true", help="the rows of every table of experiments/tables (the default, "
                   "unless the preset's `rows_from` says `downstream`)")
    p.add_argument("--downstream", action="store_true", help="the rows of the downstream tables (segmentation, "
                   "detection, transfer; the default for a preset with `rows_from: downstream`)")
    p.add_argument("--table", action="append", default=[], metavar="KEY", help="only this table's rows, e.g. lvvit_table3 "
                   "(repeatable)")
    p.add_argument("--headline", action="store_true", help="only the rows of the headline claims and their diagnostics "
                   "(experiments/headline.yaml), instead of the tables'")
    p.add_argument("--deviations", action="store_true", help="also the row pairs of the deviations table "
                   "(tlvit/deviations.py), after the tables' rows")
    p.add_argument("--preset", default=None, help="default: params.yaml `preset`")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--rows-file", default="experiments/rows.yaml")
    p.add_argument("--tables", default="experiments/tables", help="table directory")
    p.add_argument("--write", action="store_true", help="replace params.yaml `rows:` and `finetunes:` (comments elsewhere kept)")
    p.add_argument("--format", choices=("yaml", "lines"), default="yaml", help="yaml: `rows: [a, b]`; lines: one id a line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from tlvit.config import ConfigError, load_params
    from tlvit.tables import (all_rows, downstream_rows, load_tables, preset_rows, rows_yaml, set_rows_in_params,
                              split_finetunes)

    try:
        params = load_params(args.params)
        preset = args.preset or params["preset"]
        tables_dir = Path(args.tables)
        if args.headline:
            from tlvit.report.headline import load_headline

            rows = all_rows(params, preset, tables_dir, args.rows_file, args.params, wanted=load_headline().rows)
        elif args.table:
            known = {t.key for t in load_tables(tables_dir)}
            unknown = sorted(set(args.table) - known)
            if unknown:
                raise ConfigError(f"{tables_dir}: no table {unknown}; tables: {sorted(known)}")
            with tempfile.TemporaryDirectory() as tmp:  # the same ordering/dedup rules over the chosen tables only
                for key in args.table:
                    shutil.copy(tables_dir / f"{key}.yaml", Path(tmp) / f"{key}.yaml")
                rows = all_rows(params, preset, tmp, args.rows_file, args.params)
        elif args.downstream:
            rows = all_rows(params, preset, tables_dir, args.rows_file, args.params, wanted=downstream_rows())
        elif args.all:
            rows = all_rows(params, preset, tables_dir, args.rows_file, args.params)
        else:  # what the preset is for (its `rows_from`)
            rows = preset_rows(params, preset, tables_dir, args.rows_file, args.params)
        if args.deviations:
            from tlvit.deviations import DEVIATIONS

            rows += [r for r in dict.fromkeys(r for d in DEVIATIONS if d.rows for r in d.rows) if r not in rows]
        scratch, finetunes = split_finetunes(rows, args.rows_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write:
        path = Path(args.params)
        path.write_text(set_rows_in_params(path.read_text(), scratch, finetunes))
        print(f"{path}: rows = {len(scratch)} rows, finetunes = {len(finetunes)} for preset {preset}")
        return 0
    if args.format == "lines":
        print("\n".join(rows))
    else:
        print("\n".join(rows_yaml(scratch, finetunes)))
    return 0
