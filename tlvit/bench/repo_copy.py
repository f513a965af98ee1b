"""Copies of a tlvit checkout: a clone at its HEAD (what `tlvit bench repro` times, so that every run there records
a commit of the checkout's history) and a committed copy (what the end-to-end tests run in)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tlvit.bench.common import SOURCE_ROOT


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure show the end of its output."""
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def set_preset(text: str, preset: str) -> str:
    """params.yaml text with `preset:` (and `base:`, the preset it varies) set."""
    from tlvit.config import select_preset

    return select_preset(text, preset)


def tool_env(**extra: str) -> dict:
    """An environment for running this project's tools in a scratch repository: PATH starts with this
    interpreter's bin/ (dvc, tlvit), no MLFLOW_/DVC_ settings leak in, git has an identity to commit with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONDONTWRITEBYTECODE="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", **extra)
    return env


def _copy_seen_files(source: Path, dst: Path) -> None:
    """Copy the files git sees in `source` (tracked, or untracked and not ignored) to `dst`, generated outputs
    (reports/, metrics/, dvc.lock) left out."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (source / f).is_file() and not f.startswith(("reports/", "metrics/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / f, dst / f)


def source_clone(dst: Path, edit_params: Callable[[str], str], source: Path = SOURCE_ROOT,
                 **env_extra: str) -> tuple[Path, dict]:
    """`git clone` of `source` into the empty folder `dst`, the working tree's uncommitted changes copied over, the
    generated outputs (reports/, metrics/, dvc.lock) removed and params.yaml edited, nothing committed: the runs there
    record `<source HEAD>-dirty` (tlvit.provenance.git_commit), a commit that exists in the source's history, as the
    runs of a checkout whose params.yaml selects another preset do. Returns the clone and a tool_env environment."""
    env = tool_env(**env_extra)
    sh(["git", "clone", "-q", "--no-hardlinks", str(source), str(dst)], dst.parent, env)
    _copy_seen_files(source, dst)
    for generated in ("reports", "metrics"):
        shutil.rmtree(dst / generated, ignore_errors=True)
    (dst / "dvc.lock").unlink(missing_ok=True)
    params = dst / "params.yaml"
    params.write_text(edit_params(params.read_text()))
    return dst, env


def committed_copy(dst: Path, edit_params: Callable[[str], str], source: Path = SOURCE_ROOT,
                   **env_extra: str) -> tuple[Path, dict]:
    """Copy the files git sees in `source` (not generated reports/metrics/dvc.lock), edit params.yaml, commit.

    Returns the copy and an environment whose PATH starts with this interpreter's bin/ (dvc, tlvit).
    """
    _copy_seen_files(source, dst)
    params = dst / "params.yaml"
    params.write_text(edit_params(params.read_text()))
    env = tool_env(**env_extra)
    sh(["git", "init", "-q"], dst, env)
    sh(["git", "add", "-A"], dst, env)
    sh(["git", "commit", "-qm", "copy"], dst, env)
    return dst, env
