"""The job objects submitit runs: train one row (every seed), or fill one shard of the score-map stores.

Preemption: the engine checkpoints atomically after every epoch and resumes from that checkpoint by
itself, so `checkpoint()` has nothing to save; it returns a fresh copy of the job for submitit to
requeue (at most one epoch is redone). Training code is imported inside `__call__`, on the node.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import submitit

log = logging.getLogger(__name__)


def export_distributed_env() -> tuple[int, int]:
    """For a job with several tasks: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit.

    `tlvit.distributed.init_distributed` reads them (env:// rendezvous on the job's first node; gloo on
    CPU, nccl on GPU). CUDA_VISIBLE_DEVICES is left alone: each rank picks cuda:LOCAL_RANK of its node.
    Returns (rank, world_size).
    """
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (kind local)
        return 0, 1
    if job_env.num_tasks <= 1:
        return 0, 1
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return dist_env.rank, dist_env.world_size


@dataclass
class RowJob(submitit.helpers.Checkpointable):
    """Train `row` with the params in `workdir`; returns the row's metrics (mean over seeds)."""

    row: str
    workdir: str                      # the repository (on a shared filesystem): cwd of the job
    params_path: str = "params.yaml"
    rows_path: str = "experiments/rows.yaml"
    num_threads: int | None = None    # torch CPU threads per rank (launcher.slurm.cpus_per_task); None: torch's default

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        old_cwd = os.getcwd()
        os.chdir(self.workdir)  # params, rows and the run folders are relative to the repository
        try:
            return self._train()
        finally:
            os.chdir(old_cwd)

    def _train(self) -> dict:
        import torch
        import torch.distributed as dist

        from tlvit.distributed import barrier
        from tlvit.layout import Layout
        from tlvit.rows import run_row, write_row_outputs

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        rank, world = export_distributed_env()
        log.info("row %s: rank %d of %d, %d threads, job %s", self.row, rank, world, torch.get_num_threads(),
                 os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "in-process")
        try:
            metrics = run_row(self.row, self.params_path, self.rows_path, show_progress=False)
            if world > 1:
                # every rank wrote the row's metrics; rank 0's are the ones that hold the MLflow run ids
                barrier()
                if rank == 0:
                    write_row_outputs(Layout(metrics["preset"]), self.row, metrics)
        finally:
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()
        return {k: metrics[k] for k in ("row", "preset", "config_hash", "n_seeds", "top1", "top1_std")} | {
            "mlflow_run_ids": [r["mlflow_run_id"] for r in metrics["runs"]]}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """On USR2 (preemption, time limit): requeue a fresh copy; the engine's last epoch checkpoint stands."""
        log.warning("row %s: interrupted; requeueing (resumes from %s)", self.row, "the last epoch's checkpoint.pt")
        return submitit.helpers.DelayedSubmission(RowJob(self.row, self.workdir, self.params_path, self.rows_path,
                                                         self.num_threads))


@dataclass
class ScoreMapShardJob(submitit.helpers.Checkpointable):
    """Shard `shard` of `num_shards` of the preset's train and val score-map stores (`tlvit launch --scoremaps`).

    Resumable like the stage: a requeued shard skips the chunks already on disk; the last shard to finish
    a split publishes its store, which the `scoremaps` stage then finds instead of recomputing.
    """

    shard: int
    num_shards: int
    workdir: str
    params_path: str = "params.yaml"
    num_threads: int | None = None

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        old_cwd = os.getcwd()
        os.chdir(self.workdir)
        try:
            import torch

            from tlvit.annotate import annotate_split

            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            published = {}
            for split in ("train", "val"):
                store = annotate_split(split, self.params_path, shard=self.shard, num_shards=self.num_shards)
                published[split] = store is not None
                log.info("score maps %s: shard %d/%d done%s", split, self.shard, self.num_shards,
                         "; store published" if store is not None else "")
            return {"shard": self.shard, "num_shards": self.num_shards, "published": published}
        finally:
            os.chdir(old_cwd)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        log.warning("score-map shard %d/%d: interrupted; requeueing (finished chunks stay)", self.shard, self.num_shards)
        return submitit.helpers.DelayedSubmission(ScoreMapShardJob(self.shard, self.num_shards, self.workdir,
                                                                   self.params_path, self.num_threads))
