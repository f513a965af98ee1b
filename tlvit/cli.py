"""`tlvit <command>`: the harness's command line. Each command lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module with `add_parser(subparsers)` (which sets `func` via set_defaults)
COMMANDS = {
    "scoremaps": "tlvit.scoremaps_cli",
    "launch": "tlvit.launch.cli",
    "status": "tlvit.launch.cli",
    "sync": "tlvit.launch.cli",
    "pool": "tlvit.launch.cli",
    "rows": "tlvit.rows_cli",
    "bench": "tlvit.bench.cli",
    "deviations": "tlvit.deviations_cli",
    "tiny-imagenet": "tlvit.data.tiny_imagenet",
    "eval": "tlvit.evaluate",
    "tune": "tlvit.tune",
    "preset": "tlvit.preset_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):  # a module may define several commands
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
