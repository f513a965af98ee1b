"""Thin DVC stage entry points (`python -m pipeline.<stage>`); the work is done by `tlvit`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

# Set to a directory, each stage writes there which of the repository's modules it loaded (`<stage>.json`):
# the end-to-end test checks them against the stage's deps in dvc.yaml.
RECORD_IMPORTS = "TLVIT_RECORD_IMPORTS"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; input errors end it with one clear line (file/row + fix) instead of a traceback.

    The error classes are imported only when something failed, so the modules a stage loads are the ones
    its work needs (what TLVIT_RECORD_IMPORTS records).
    """
    try:
        main()
    except Exception as e:
        from tlvit.config import ConfigError
        from tlvit.data.datasets import DatasetError
        from tlvit.labels.score_maps import ScoreMapError
        from tlvit.launch.records import LaunchError

        if not isinstance(e, (ConfigError, DatasetError, ScoreMapError, LaunchError, FileNotFoundError)):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get(RECORD_IMPORTS):
        record_imports(Path(os.environ[RECORD_IMPORTS]) / f"{Path(sys.argv[0]).stem}.json")


def one_line(e: Exception) -> str:
    """The error's own message. Raised in a DataLoader worker, torch re-raises it in the main process with the
    worker's traceback in the message; its last line is `module.Class: message`, the line the user needs."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def record_imports(path: Path) -> None:
    """Write (merging with what is there: the train stage runs once per row) the repository's own modules
    loaded: files under tlvit/ and pipeline/ (not a virtual environment that may live in the checkout)."""
    root = Path(__file__).resolve().parent.parent
    loaded = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not Path(file).is_absolute():  # a few of torch's modules carry bare names
            continue
        resolved = Path(file).resolve()
        if resolved.is_relative_to(root) and resolved.relative_to(root).parts[0] in ("tlvit", "pipeline"):
            loaded.add(resolved.relative_to(root).as_posix())
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        loaded |= set(json.loads(path.read_text()))
    path.write_text(json.dumps(sorted(loaded), indent=1))
