"""`tlvit pool`: train the preset's runs (one per row and seed) with N processes of one torch thread each on this
machine, then `dvc repro` records them (each `train@<row>` stage finds its seeds' checkpoints complete and only
collects them, as after `tlvit launch`).

Why: `dvc repro` trains rows one after the other, each with every core. The embedded models are small, and on a
2-core machine two single-threaded runs side by side do ~1.45x the work of one run with two threads (measured:
docs/cluster.md); the unit here is the (row, seed) run, so a large row's seeds spread over the processes too.
Runs go longest first (parameters x tokens x epochs), so that the last one to finish is a short one. Every run keeps one
thread whichever process takes it, so its metrics do not depend on the schedule. Fine-tunes wait for their
parent's seed.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolRun:
    row: str
    seed: int
    parent: str | None  # a fine-tune's parent row (its seed must be complete first)
    cost: float  # relative training cost, to order the runs longest first


def plan_pool(params: dict, rows: list[str] | None = None, params_path: str | Path = "params.yaml",
              rows_path: str | Path = "experiments/rows.yaml", root: str | Path = ".") -> list[PoolRun]:
    """The runs of `rows` (default: params `rows` and `finetunes`) whose checkpoints are not complete, longest first."""
    from tlvit.config import ConfigError, config_hash, pipeline_rows, preset_section, resolve_run_config
    from tlvit.layout import Layout

    layout = Layout(params["preset"], Path(root))
    parents = pipeline_rows(params, params_path)
    unknown = sorted(set(rows or []) - set(parents))
    if unknown:
        raise ConfigError(f"{params_path}: rows {unknown} are not in `rows` or `finetunes`")
    seeds = preset_section(params, params_path=params_path)["seeds"]
    out = []
    for row in rows or list(parents):
        cfg = resolve_run_config(params, row, rows_path=rows_path, params_path=params_path)
        cost, chash = _relative_cost(cfg), config_hash(cfg)
        for seed in seeds:
            if not run_complete(layout.run_dir(row, seed), chash):
                out.append(PoolRun(row, seed, parents[row], cost))
    return sorted(out, key=lambda r: (r.parent is not None, -r.cost))


def run_complete(run_dir: Path, chash: str) -> bool:
    """Has this run finished for this config? (`result.json`, written when a run ends, says complete.)"""
    import json

    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(result.get("complete")) and result.get("config_hash") == chash


def _relative_cost(cfg: dict) -> float:
    """Parameters x tokens x epochs of the row's model (built on the meta device): enough to order runs."""
    import torch

    from tlvit.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, 10)
    tokens = model.token_grid[0] * model.token_grid[1]
    return sum(p.numel() for p in model.parameters()) * tokens * (cfg["epochs"] + cfg.get("cooldown_epochs", 0))


def _train_one(row: str, seed: int, params_path: str, rows_path: str, threads: int, workdir: str) -> tuple[str, int, float]:
    """In a worker process: train (or resume) one run exactly as the row's stage would."""
    import torch

    os.chdir(workdir)
    torch.set_num_threads(threads)
    from tlvit.config import load_params, resolve_run_config
    from tlvit.layout import Layout
    from tlvit.rows import seed_inputs
    from tlvit.tables import experiment_for_row
    from tlvit.train import train

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{row} seed {seed}] %(message)s")
    params = load_params(params_path)
    cfg = resolve_run_config(params, row, rows_path=rows_path, params_path=params_path)
    layout = Layout(params["preset"])
    inputs = seed_inputs(layout, layout.dataset(), cfg, seed)
    experiment, tags = experiment_for_row(row, params["preset"], params=params, rows_path=rows_path,
                                          params_path=params_path)
    result = train(cfg, seed, layout.run_dir(row, seed), inputs, show_progress=False, experiment=experiment, tags=tags)
    return row, seed, result["top1"]


def run_pool(runs: list[PoolRun], *, jobs: int = 2, threads: int = 1, params_path: str = "params.yaml",
             rows_path: str = "experiments/rows.yaml", workdir: str | Path = ".", worker=None,
             executor=None) -> list[tuple[str, int, float]]:
    """Train `runs` with `jobs` worker processes (`threads` torch threads each); a fine-tune starts once its parent's
    seed has finished. Returns (row, seed, top-1) in the order they finished; the first failure is raised after the
    runs already started have ended (their checkpoints stand). `worker`/`executor` replace the training function
    and the process pool (tests)."""
    import multiprocessing

    if worker is None:
        from tlvit.tracking import default_tracking_uri, prepare_store

        prepare_store(default_tracking_uri(str(workdir)))  # one schema migration here, not one per worker
        worker = _train_one
    if executor is None:  # a fresh interpreter per run: no forked torch thread pools, its own logging prefix
        executor = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                       max_tasks_per_child=1)
    pending, done, finished = list(runs), set(), []
    waiting_on = {(r.row, r.seed) for r in runs}
    futures = {}
    error = None
    with executor as pool:
        while pending or futures:
            ready = [r for r in pending if r.parent is None or (r.parent, r.seed) not in waiting_on - done]
            while ready and len(futures) < jobs and error is None:
                r = ready.pop(0)
                pending.remove(r)
                log.info("pool: starting %s seed %d", r.row, r.seed)
                futures[pool.submit(worker, r.row, r.seed, params_path, rows_path, threads,
                                    str(Path(workdir).resolve()))] = r
            if not futures:
                break
            finished_now, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished_now:
                r = futures.pop(f)
                try:
                    finished.append(f.result())
                    done.add((r.row, r.seed))
                    log.info("pool: %s seed %d done: top-1 %.2f", r.row, r.seed, finished[-1][2])
                except Exception as e:  # noqa: BLE001 - reported after the running runs end
                    log.error("pool: %s seed %d failed: %s", r.row, r.seed, e)
                    error = error or e
            if error is not None:
                pending.clear()
    if error is not None:
        raise error
    return finished
