"""`tlvit deviations`: the registry of differences from the authors' code, as the Markdown of docs/deviations.md."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deviations", help="print (or write) the table of deviations from the authors' code",
                       description="Render tlvit/deviations.py, the one registry of where tlvit's defaults differ from "
                                   "the authors' code, with each switch and the row pair that measures it.")
    p.add_argument("--write", metavar="PATH", help="write the Markdown here (docs/deviations.md) instead of printing it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tlvit.deviations import render_markdown
    from tlvit.io import atomic_path

    text = render_markdown()
    if args.write:
        with atomic_path(Path(args.write)) as tmp:
            tmp.write_text(text)
        print(f"{args.write}: {text.count(chr(10))} lines")
    else:
        print(text, end="")
    return 0
