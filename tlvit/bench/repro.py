"""Item 4: wall time of `dvc repro` from a clean state, and of a no-op `dvc repro` (target <= 3 s).

Each preset runs in a fresh committed copy of this checkout (`tests/repo_copy.committed_copy`: the
files git sees, no outputs, no DVC cache, MLflow in the copy), so "clean" means every stage runs.
The no-op is `dvc repro` again right after, repeated; the median counts. `--quick` reproduces only
the smoke preset's `data` stage (seconds), which checks the code path, not the pipeline's time.
The embedded preset takes ~30 min on 2 cores: ask for it with `--presets smoke embedded`.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tlvit.bench.common import SOURCE_ROOT, Bench, Target, markdown_table, summary

NOOP_TARGET_S = 3.0


def repo_copy_module():
    """tests/repo_copy.py of the source checkout (the helper the end-to-end tests use)."""
    path = SOURCE_ROOT / "tests" / "repo_copy.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; `tlvit bench repro` needs a source checkout of tlvit (pip install -e .)")
    spec = importlib.util.spec_from_file_location("tlvit_bench_repo_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def timed_repro(repo: Path, env: dict, targets: list[str], timeout: float | None) -> tuple[float, list[str]]:
    """(wall seconds, stages that ran) of `dvc repro [targets]`; fails with the end of its output."""
    t0 = time.perf_counter()
    p = subprocess.run(["dvc", "repro", *targets], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"dvc repro {' '.join(targets)} failed ({p.returncode}) in {repo}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return seconds, ran_stages(p.stdout)


def dvc_version(env: dict) -> str:
    p = subprocess.run(["dvc", "--version"], env=env, capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def run(out_dir: str | Path, *, quick: bool = False, presets: tuple[str, ...] = ("smoke",), noop_repeats: int | None = None,
        timeout_s: float | None = None, keep: bool = False) -> dict:
    """Clean `dvc repro` then `noop_repeats` no-op ones, per preset."""
    rc = repo_copy_module()
    noop_repeats = noop_repeats or (1 if quick else 5)
    targets = ["data"] if quick else []
    bench = Bench("repro", out_dir, quick=quick)
    results, rows, checks = {}, [], []
    for preset in presets:
        tmp = Path(tempfile.mkdtemp(prefix=f"tlvit-bench-repro-{preset}-"))
        repo, env = rc.committed_copy(tmp, lambda text, p=preset: rc.set_preset(text, p))
        clean_s, stages = timed_repro(repo, env, targets, timeout_s)
        bench.sample_load()
        noops = []
        for _ in range(noop_repeats):
            seconds, again = timed_repro(repo, env, targets, timeout_s)
            if again:
                raise RuntimeError(f"a second `dvc repro` in {repo} ran stages {again}: the pipeline is not idempotent")
            noops.append(seconds)
        noop = summary(noops, 2)
        results[preset] = {"clean_s": round(clean_s, 1), "stages": stages, "noop_s": noop, "targets": targets or "all",
                           "copy": str(repo) if keep else None}
        rows.append((preset + (" (data stage only)" if targets else ""), f"{clean_s:.1f}", len(stages),
                     f"{noop['median']:.2f}", f"{noop['q25']:.2f}–{noop['q75']:.2f}"))
        checks.append(Target(f"repro: no-op `dvc repro` ({preset})", noop["median"], "<=", NOOP_TARGET_S, unit=" s"))
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    table = markdown_table(("preset", "clean `dvc repro` (s)", "stages run", "no-op (s, median)", "no-op q25–q75"), rows)
    settings = {"presets": list(presets), "dvc_targets": targets or "all stages", "noop_repeats": noop_repeats,
                "dvc": dvc_version(env), "clean": "fresh committed copy of the checkout: no outputs, no DVC cache"}
    return bench.finish(settings=settings, results=results, targets=checks, tables=[table])
