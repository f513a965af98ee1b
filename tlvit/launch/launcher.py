"""`tlvit launch`: submit every stale training row at once, record each job, return.

The rows to train are the `train@<row>` / `finetune@<row>` stages DVC reports as changed. A later `dvc repro` runs those
stages as usual; each waits for its row's job and then finds the checkpoints complete, so it only
collects the results and `dvc.lock` stays the one record of what was computed.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tlvit.config import ConfigError, config_hash, load_params, pipeline_rows, resolve_run_config
from tlvit.launch.executor import LauncherConfig, check_fits_cluster, check_shared, load_launcher_config, make_executor
from tlvit.launch.job import RowJob, ScoreMapShardJob
from tlvit.launch.records import LaunchError, LaunchRecord, poll, read_record, wait, write_record
from tlvit.layout import Layout

log = logging.getLogger(__name__)
TRAIN_STAGE, FINETUNE_STAGE = "train@", "finetune@"


def stage_name(row: str, parents: dict[str, str | None]) -> str:
    """The DVC stage that trains `row`: finetune@<row> for params.yaml `finetunes`, else train@<row>."""
    return f"{FINETUNE_STAGE if parents.get(row) else TRAIN_STAGE}{row}"


@dataclass
class DvcStatus:
    stale_rows: list[str]        # rows whose train@/finetune@ stage would run
    stale_upstream: list[str]    # other stages they depend on that would run first


def dvc_status(rows: list[str], workdir: str | Path = ".", parents: dict[str, str | None] | None = None) -> DvcStatus:
    """`dvc status --json --with-deps` of the rows' training stages (and what they depend on).

    parents: params.yaml's rows -> parent (config.pipeline_rows); fine-tunes are `finetune@` stages.
    """
    parents = parents or {}
    stages = {stage_name(r, parents): r for r in rows}
    changed = changed_stages(list(stages), workdir)
    stale = [row for stage, row in stages.items() if stage in changed]
    upstream = [s for s in changed if not s.startswith((TRAIN_STAGE, FINETUNE_STAGE))]
    return DvcStatus(stale, upstream)


def changed_stages(stages: list[str], workdir: str | Path = ".") -> dict:
    """`dvc status --json --with-deps` of `stages`: each stage that would run (these or upstream) -> its changes."""
    cmd = [sys.executable, "-m", "dvc", "status", "--json", "--with-deps", *stages]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"`dvc status` failed in {workdir} ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    out = p.stdout.strip()
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def _launch_setup(workdir: str | Path, params_path: str | Path,
                  launcher: LauncherConfig | None) -> tuple[Path, dict, LauncherConfig, int | None]:
    """(workdir resolved, params, launcher, torch threads per job) after the checks every submission needs: a shared
    job folder where nodes need one, and on Slurm a request some node can hold."""
    workdir = Path(workdir).resolve()
    params = load_params(workdir / params_path)
    launcher = launcher or load_launcher_config(params, params_path=params_path)
    check_shared(launcher, workdir)
    if launcher.kind == "slurm":
        check_fits_cluster(launcher.slurm)
    threads = launcher.slurm.cpus_per_task if launcher.kind == "slurm" else None  # local kinds: torch default
    return workdir, params, launcher, threads


def launch_rows(rows: list[str], *, params_path: str | Path = "params.yaml", rows_path: str | Path = "experiments/rows.yaml",
                workdir: str | Path = ".", launcher: LauncherConfig | None = None) -> list[LaunchRecord]:
    """Submit one job per row (a Slurm array when there are several), write each row's launch record.

    Paths are relative to `workdir` (the repository), where the jobs run.
    """
    from tlvit.provenance import git_commit

    workdir, params, launcher, threads = _launch_setup(workdir, params_path, launcher)
    preset = params["preset"]
    layout = Layout(preset, workdir)
    from tlvit.train import check_run_config

    hashes = {}
    for row in rows:
        cfg = resolve_run_config(params, row, rows_path=workdir / rows_path, params_path=params_path)
        try:  # here, not on the node: a bad value would fail there, and `dvc repro` would resubmit it once
            check_run_config(cfg)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"row {row!r} cannot train as configured ({type(e).__name__}: {e}); fix it in "
                              f"{rows_path} or {params_path}, then launch again") from e
        hashes[row] = config_hash(cfg)
    folder = launcher.folder_path(workdir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}" / "%j"
    executor = make_executor(launcher, folder, name=f"tlvit-{preset}")
    jobs_in = [RowJob(row, str(workdir), str(params_path), str(rows_path), num_threads=threads) for row in rows]
    if launcher.kind != "local":  # one schema migration here, not one per concurrently starting job
        from tlvit.tracking import default_tracking_uri, prepare_store

        uri = default_tracking_uri(workdir)
        prepare_store(uri)
        if launcher.kind == "slurm" and uri.startswith("sqlite:"):
            log.warning("MLflow store is a SQLite file (%s): jobs on other nodes should log to a server instead "
                        "(MLFLOW_TRACKING_URI=http://<host>:<port>, docs/cluster.md)", uri)
    commit = git_commit(workdir)
    submitted_at = time.time()
    with executor.batch():  # one sbatch for all rows (an array), so they queue together
        jobs = [executor.submit(job) for job in jobs_in]
    records = []
    for row, job in zip(rows, jobs):
        record = LaunchRecord(row=row, preset=preset, config_hash=hashes[row], kind=launcher.kind, job_id=str(job.job_id),
                              folder=str(folder), workdir=str(workdir), submitted_at=submitted_at, git_commit=commit)
        if launcher.kind == "local":
            record.state, record.error = job.state, job.error
        write_record(layout, record)
        records.append(record)
    return records


def launch_scoremaps(num_shards: int, *, params_path: str | Path = "params.yaml", workdir: str | Path = ".",
                     launcher: LauncherConfig | None = None) -> list[str]:
    """Submit `num_shards` score-map jobs (one Slurm array) that fill the preset's stores; returns the job ids.

    Each job computes every num_shards-th chunk of the train and val stores; the last to finish a split
    publishes its store. `dvc repro` then runs the `scoremaps` stage, which finds the stores published for its
    settings and only records them. The annotator stage must be current first (its weights define the maps).
    """
    if num_shards < 1:
        raise ConfigError(f"--scoremaps {num_shards}: give the number of shards (array tasks), at least 1")
    workdir, params, launcher, threads = _launch_setup(workdir, params_path, launcher)
    stale = sorted(changed_stages(["annotator"], workdir))
    if stale:
        raise ConfigError(f"stages {stale} must run before the score maps: `dvc repro {' '.join(stale)}`, then launch again")
    preset = params["preset"]
    folder = launcher.folder_path(workdir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-scoremaps" / "%j"
    executor = make_executor(launcher, folder, name=f"tlvit-{preset}-scoremaps")
    with executor.batch():
        jobs = [executor.submit(ScoreMapShardJob(i, num_shards, str(workdir), str(params_path), threads))
                for i in range(num_shards)]
    return [str(j.job_id) for j in jobs]


def plan_launch(params: dict, rows: list[str], workdir: str | Path, rows_path: str | Path, params_path: str | Path,
                status: DvcStatus | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Which rows to submit, and (row, reason) for those left alone."""
    parents = pipeline_rows(params, params_path)
    if status is None:
        status = dvc_status(rows, workdir, parents)
    if status.stale_upstream:
        raise ConfigError(f"stages {status.stale_upstream} must run before training: `dvc repro {' '.join(status.stale_upstream)}` "
                          f"(here or as a job), then `tlvit launch` again")
    layout = Layout(params["preset"], Path(workdir))
    submit, skipped = [], []
    for row in rows:
        if row not in status.stale_rows:
            skipped.append((row, "up to date in dvc.lock"))
            continue
        if parents.get(row) in status.stale_rows:  # it needs the parent's final weights, which do not exist yet
            skipped.append((row, f"fine-tune of {parents[row]}, which is stale too; launch again once it has finished "
                                 "(or let `dvc repro` train both in order)"))
            continue
        record = read_record(layout, row)
        if record is not None:
            chash = config_hash(resolve_run_config(params, row, rows_path=Path(workdir) / rows_path, params_path=params_path))
            st = poll(record)
            if record.config_hash == chash and st.phase in ("active", "done"):
                skipped.append((row, f"job {record.job_id} {st.state}" + (" (run `dvc repro` to record it)" if st.phase == "done" else "")))
                continue
            if st.active:
                raise ConfigError(f"row {row!r}: job {record.job_id} is still {st.state} with an older config; "
                                  f"cancel it (scancel {record.job_id}) before launching the new one")
        submit.append(row)
    return submit, skipped


# ---------------------------------------------------------------------------- the train@<row> stage
def await_launched_row(row: str, config_hash: str, params: dict, params_path: str | Path = "params.yaml",
                       rows_path: str | Path = "experiments/rows.yaml", root: str | Path = ".") -> str:
    """Before the DVC stage trains `row`: wait for a job `tlvit launch` submitted for it.

    Returns 'none' (no job for this config), 'done' (its checkpoints are complete: training just
    collects them) or 'failed' (say so; the caller trains the row here). A job still running an older
    config raises LaunchError. With `launcher.kind: slurm` a failed job is resubmitted once and waited
    for; a second failure raises, so a failed row is never recorded as done.
    """
    from tlvit.provenance import git_commit

    layout = Layout(params["preset"], Path(root))
    record = read_record(layout, row)
    if record is None:
        return "none"
    if record.config_hash != config_hash:
        status = poll(record)
        if status.active:
            raise LaunchError(f"row {row!r}: {record.kind} job {record.job_id} is still {status.state} with an older "
                              f"config ({record.config_hash}, now {config_hash}) in {layout.run_dir(row, 0).parent}; "
                              f"cancel it (scancel {record.job_id}) or let it end, then run again")
        return "none"
    status = wait(record)
    if status.phase == "done":
        commit = git_commit(root)
        if record.git_commit != commit:
            print(f"train@{row}: note: job {record.job_id} ran at commit {record.git_commit}, the repository is at {commit}",
                  flush=True)
        print(f"train@{row}: job {record.job_id} completed; collecting its results", flush=True)
        return "done"
    print(f"train@{row}: {record.kind} job {record.job_id} ended {status.state}:\n{status.detail}", flush=True)
    launcher = load_launcher_config(load_params(params_path), params_path=params_path)
    if launcher.kind != "slurm":
        print(f"train@{row}: training it here instead (launcher.kind: {launcher.kind})", flush=True)
        return "failed"
    (record,) = launch_rows([row], params_path=params_path, rows_path=rows_path, workdir=root, launcher=launcher)
    print(f"train@{row}: resubmitted as job {record.job_id}", flush=True)
    status = wait(record)
    if status.phase != "done":
        raise LaunchError(f"row {row!r}: resubmitted job {record.job_id} ended {status.state} too:\n{status.detail}")
    return "done"
