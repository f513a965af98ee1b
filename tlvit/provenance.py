"""Where a number came from: git commit, package versions, machine."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


# Tracked files that `dvc repro` itself rewrites: changing them says nothing about the code that ran
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "reports")


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's sha, suffixed `-dirty` when tracked files other than pipeline outputs differ from it; 'unknown' outside git.

    Outputs are left out because a `dvc repro` writes them while it runs: every stage after the first
    would otherwise call the commit dirty although the code is HEAD's.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *[f":(exclude,top){p}" for p in PIPELINE_OUTPUTS]],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import numpy
    import timm
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "machine": platform.machine(), "cpu_threads": str(torch.get_num_threads()),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def cluster_tags() -> dict[str, str]:
    """Slurm job id, node list and requeue count when running under Slurm (tags of the MLflow run)."""
    import os

    names = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
             "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_JOB_NODELIST": "slurm_nodelist",
             "SLURM_RESTART_COUNT": "slurm_requeue_count", "SLURM_NTASKS": "slurm_ntasks"}
    tags = {tag: os.environ[var] for var, tag in names.items() if var in os.environ}
    if "slurm_job_id" in tags:
        tags.setdefault("slurm_requeue_count", "0")
    return tags
