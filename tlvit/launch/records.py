"""Launch records: which job trains a row (`runs/<preset>/<row>/launch.json`), and its state.

`tlvit launch` writes a record per submitted row; the row's DVC stage (`pipeline.train`) reads it and,
while the job is pending or running, waits for it instead of training the same run concurrently.
States come from Slurm's accounting (`sacct`, through submitit, forced: its cache lags) and from
submitit's result pickle, which is what tells a finished job from a failed one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tlvit.io import write_json
from tlvit.layout import Layout

log = logging.getLogger(__name__)

# Slurm states of a job that may still run (or run again: REQUEUED, PREEMPTED before its requeue).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "READY"}
# sacct may not list a job for a few seconds after sbatch returns (and never, once the database is purged).
UNKNOWN_GRACE_S = 120.0


class LaunchError(RuntimeError):
    """A launched job that blocks the row (still running an older config, or failed twice)."""


@dataclass
class LaunchRecord:
    """One submitted row: enough to find the job again from any process on any node."""

    row: str
    preset: str
    config_hash: str          # the row's resolved config when it was launched
    kind: str                 # launcher kind: local | submitit-local | slurm
    job_id: str               # Slurm id (array tasks: <array>_<index>), local controller pid, or local-<pid>-<n>
    folder: str               # submitit folder template (absolute, may contain %j)
    workdir: str              # the repository the job runs in
    submitted_at: float
    git_commit: str = "unknown"
    state: str | None = None  # only for kind local (ran in-process): its final state
    error: str | None = None  # only for kind local: the traceback of a failure

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class JobStatus:
    state: str                # Slurm's word (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or LOST
    phase: str                # active | done | failed
    detail: str = ""          # failures: the error and where the logs are

    @property
    def active(self) -> bool:
        return self.phase == "active"


def record_path(layout: Layout, row: str) -> Path:
    """`runs/<preset>/<row>/launch.json` (inside the row's DVC output, so it stays with the run)."""
    return layout.run_dir(row, 0).parent / "launch.json"


def write_record(layout: Layout, record: LaunchRecord) -> Path:
    path = record_path(layout, record.row)
    write_json(path, record.to_dict())
    return path


def read_record(layout: Layout, row: str) -> LaunchRecord | None:
    path = record_path(layout, row)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(LaunchRecord)}
    return LaunchRecord(**{k: v for k, v in data.items() if k in fields})


# ---------------------------------------------------------------------------- state
def _job_paths(record: LaunchRecord):
    from submitit.core.utils import JobPaths

    return JobPaths(record.folder, job_id=record.job_id, task_id=0)


def _outcome(record: LaunchRecord) -> JobStatus | None:
    """The result pickle's verdict, when the job has written one."""
    from submitit.core.utils import pickle_load

    paths = _job_paths(record)
    if not paths.result_pickle.exists():
        return None
    try:
        outcome, value = pickle_load(paths.result_pickle)
    except (EOFError, OSError):  # still being written
        return None
    if outcome == "success":
        return JobStatus("COMPLETED", "done")
    lines = str(value).strip().splitlines()
    return JobStatus("FAILED", "failed", "\n".join(lines[-12:]) + f"\n(logs: {paths.stderr})")


def _logs_hint(record: LaunchRecord) -> str:
    paths = _job_paths(record)
    tail = ""
    if paths.stderr.is_file():
        tail = "\n".join(paths.stderr.read_text(errors="replace").strip().splitlines()[-12:])
    return (tail + "\n" if tail else "") + f"(logs: {paths.stderr}, {paths.stdout})"


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def slurm_state(job_id: str, folder: str) -> str:
    """Slurm's state of a job: `squeue` while the controller has it queued or running (accounting lags
    behind it by seconds, array tasks most), else a forced `sacct` through submitit (its cache lags too)."""
    import subprocess

    import submitit

    try:
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
        live = q.stdout.split()
        if q.returncode == 0 and live:
            return live[0].upper()
    except (OSError, subprocess.TimeoutExpired):
        pass
    job = submitit.SlurmJob(folder=folder, job_id=job_id)
    state = job.get_info(mode="force").get("State") or "UNKNOWN"
    return state.split()[0].upper()  # "CANCELLED by 0" -> CANCELLED


def pending_reason(job_id: str) -> str | None:
    """squeue's Reason for a queued job (Resources, Priority, ReqNodeNotAvail, ...); None when not pending."""
    import subprocess

    try:
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PENDING", "-o", "%r"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    reason = q.stdout.strip().splitlines()
    return reason[0].strip() if q.returncode == 0 and reason and reason[0].strip() not in ("", "None") else None


def log_path(record: LaunchRecord) -> str | None:
    """The job's stderr log (task 0); None for a job that ran in the launching process."""
    return None if record.kind == "local" else str(_job_paths(record).stderr)


def poll(record: LaunchRecord) -> JobStatus:
    """Where the record's job is now."""
    if record.kind == "local":  # ran in the launching process; the record holds the outcome
        if record.state == "COMPLETED":
            return JobStatus("COMPLETED", "done")
        return JobStatus(record.state or "LOST", "failed", record.error or "")
    done = _outcome(record)
    if done is not None and (done.phase == "done" or record.kind != "slurm"):
        return done
    age = time.time() - record.submitted_at
    if record.kind == "submitit-local":
        if _pid_alive(int(record.job_id)):
            return JobStatus("RUNNING", "active")
        time.sleep(1.0)  # the result pickle is written just before the process ends
        return _outcome(record) or JobStatus("FAILED", "failed", "the job's process ended without a result\n" + _logs_hint(record))
    state = slurm_state(record.job_id, record.folder)
    if state in ACTIVE_STATES:
        # An error pickle of a job Slurm runs again is an earlier attempt's: the SIGTERM of a requeue can reach
        # submitit's own `scontrol requeue` call in the job before it returns, which submitit then reports as the
        # job's error although the requeue went through; the requeued attempt writes the pickle again.
        return JobStatus(state, "active")
    if done is not None:
        return done
    if state == "UNKNOWN":
        if age < UNKNOWN_GRACE_S:
            return JobStatus("PENDING", "active")  # sacct has not caught up with sbatch yet
        return JobStatus("LOST", "failed", f"Slurm has no record of job {record.job_id}\n" + _logs_hint(record))
    if state == "COMPLETED":  # the result pickle may lag on a network filesystem
        for _ in range(10):
            time.sleep(1.0)
            done = _outcome(record)
            if done is not None:
                return done
    return JobStatus(state, "failed", _logs_hint(record))


def wait(record: LaunchRecord, poll_s: float | None = None, report_every_s: float = 300.0) -> JobStatus:
    """Poll until the job leaves the active states (pending, running, requeued)."""
    poll_s = float(os.environ.get("TLVIT_LAUNCH_POLL_S", 10.0)) if poll_s is None else poll_s
    status, last_report, last_state = poll(record), time.time(), None
    while status.active:
        if status.state != last_state or time.time() - last_report > report_every_s:
            print(f"train@{record.row}: waiting for {record.kind} job {record.job_id} ({status.state})", flush=True)
            last_state, last_report = status.state, time.time()
        time.sleep(poll_s)
        status = poll(record)
    return status
