"""`tlvit preset NAME`: choose the preset `dvc repro` runs (sets `preset:` and `base:` in params.yaml)."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("preset", help="choose the preset dvc repro runs (sets `preset` and `base` in params.yaml)",
                       description=__doc__)
    p.add_argument("name", nargs="?", default=None, help="a preset of params.yaml; none: print the current one")
    p.add_argument("--params", default="params.yaml", type=Path)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from tlvit.config import ConfigError, load_params, select_preset
    from tlvit.io import atomic_path

    try:
        text = args.params.read_text()
        if args.name is None:
            params = load_params(args.params)
            print(f"preset: {params['preset']} (base: {params.get('base', params['preset'])})")
            return 0
        new = select_preset(text, args.name)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_path(args.params) as tmp:
        tmp.write_text(new)
    print(f"{args.params}: preset {args.name} (base: {load_params(args.params).get('base')})")
    return 0
