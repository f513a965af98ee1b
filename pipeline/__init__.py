"""Thin DVC stage entry points (`python -m pipeline.<stage>`); the work is done by `tlvit`."""
from __future__ import annotations

import sys
from typing import Callable


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; input errors end it with one clear line (file/row + fix) instead of a traceback."""
    from tlvit.config import ConfigError
    from tlvit.data.datasets import DatasetError
    from tlvit.labels.score_maps import ScoreMapError
    from tlvit.launch.records import LaunchError

    try:
        main()
    except (ConfigError, DatasetError, ScoreMapError, LaunchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
