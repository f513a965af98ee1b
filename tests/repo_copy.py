"""A committed git copy of this repository for tests that run the real pipeline (`dvc repro`, `tlvit launch`)."""
from __future__ import annotations

from pathlib import Path

from tlvit.bench.repo_copy import committed_copy, set_preset, sh, tool_env  # noqa: F401  (the tests' helpers)
from tlvit.bench.repro import STAGE_LINE

REPO = Path(__file__).resolve().parents[1]


def ran_stages(dvc_output: str) -> list[str]:
    """The stages `dvc repro` ran, in order, read the way `tlvit bench repro` reads them."""
    return STAGE_LINE.findall(dvc_output)
