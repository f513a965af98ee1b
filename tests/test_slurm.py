"""Rows trained through a real single-node Slurm (munge, slurmctld, slurmd, slurmdbd + MariaDB), started by
`scripts/slurm-up.sh` from a session fixture. Needs root (CI runs as root); skipped otherwise.

Jobs use 1 CPU per task and tiny configs (lvvit_e, 64 px, a few hundred generated images, a few epochs),
so two of them fit the 2-core CI machine at once. Each test uses its own submitit folder.
Timings are printed as `[slurm-timing] ...` (run with -s to see them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from repo_copy import committed_copy, ran_stages, set_preset, sh
from test_launch import make_tiny_repo
from tlvit.config import load_params
from tlvit.launch import records as rec
from tlvit.launch.launcher import launch_rows
from tlvit.layout import Layout

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    """The project's single-node Slurm, up and running jobs (left running afterwards: `make slurm-down`)."""
    if os.geteuid() != 0:
        pytest.skip("real-Slurm tests need root: scripts/slurm-up.sh installs (apt) and starts munge, MariaDB, "
                    "slurmdbd, slurmctld and slurmd on this machine (CI runs as root)")
    t0 = time.time()
    p = subprocess.run(["bash", str(REPO / "scripts" / "slurm-up.sh")], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"scripts/slurm-up.sh failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    print(f"\n[slurm-timing] slurm-up.sh: {time.time() - t0:.1f} s")
    yield


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch, tmp_path):
    """Environment the jobs inherit (sbatch exports the submitter's): quick polling, a private MLflow store."""
    monkeypatch.setenv("TLVIT_LAUNCH_POLL_S", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    jobs: list[str] = []
    yield jobs
    if jobs:  # never leave a test's job behind on the shared machine
        subprocess.run(["scancel", *{j.split("_")[0] for j in jobs}], capture_output=True)


def slurm_launcher(tmp_path: Path, **slurm) -> dict:
    return {"kind": "slurm", "folder": str(tmp_path / "submitit"),  # unique per test run
            "slurm": {"cpus_per_task": 1, "timeout_min": 60, "signal_delay_s": 30, **slurm}}


def timing(name: str, seconds: float) -> None:
    print(f"\n[slurm-timing] {name}: {seconds:.1f} s")


def job_log(record: rec.LaunchRecord, task: int = 0) -> str:
    folder = Path(record.folder.replace("%j", record.job_id))
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{record.job_id}_{task}_log.*")))


def checkpoint_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception:  # not there yet
        return 0


def stage_run_row(repo: Path, row: str) -> dict:
    """What `dvc repro` runs for train@<row> (`python -m pipeline.train --row <row>` of `repo`), in this process;
    cwd = repo. Returns the row's metrics file."""
    sys.path.insert(0, str(repo))
    try:
        from pipeline.train import main

        main(["--row", row])
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("pipeline.train", None), sys.modules.pop("pipeline", None)
    return json.loads(Layout(load_params(repo / "params.yaml")["preset"], repo).row_metrics(row).read_text())


def sacct_states(job_id: str, until: str | None = None, timeout: float = 60) -> list[str]:
    """Every state sacct has for the job (-D: requeued runs too); with `until`, wait for that one (sacct lags)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
        states = [line.split()[0] for line in out.splitlines() if line.strip()]
        if until is None or until in states or time.time() > deadline:
            return states
        time.sleep(1)


def launch_and_wait(repo: Path, slurm_env: list, what: str):
    """Launch row `a` of a tiny repo on Slurm, wait for its job; (record, final status), time printed."""
    t0 = time.time()
    (record,) = launch_rows(["a"], workdir=repo)
    slurm_env.append(record.job_id)
    status = rec.wait(record, poll_s=1)
    timing(what, time.time() - t0)
    return record, status


# ---------------------------------------------------------------------------- one row, end to end
def test_one_row_end_to_end(slurm_env, tmp_path, monkeypatch):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}}, epochs=3, per_class=32, launcher=slurm_launcher(tmp_path))
    record, status = launch_and_wait(repo, slurm_env, "one row: submit -> COMPLETED")
    assert status.phase == "done", status.detail
    assert "COMPLETED" in sacct_states(record.job_id, until="COMPLETED")
    metrics = json.loads((repo / "metrics" / "tiny" / "rows" / "a.json").read_text())
    result = json.loads((repo / "runs" / "tiny" / "a" / "seed0" / "result.json").read_text())
    assert result["complete"] and result["epochs"] == 3 and metrics["top1"] == result["top1"]
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(metrics["runs"][0]["mlflow_run_id"]).data.tags
    assert tags["slurm_job_id"] == record.job_id and tags["slurm_requeue_count"] == "0"

    # the DVC stage's run_row then collects without training
    ckpt = repo / "runs" / "tiny" / "a" / "seed0" / "checkpoint.pt"
    mtime = ckpt.stat().st_mtime
    monkeypatch.chdir(repo)
    t0 = time.time()
    collected = stage_run_row(repo, "a")
    timing("one row: collect", time.time() - t0)
    assert ckpt.stat().st_mtime == mtime and collected["top1"] == metrics["top1"]


def test_failed_job_is_resubmitted_once_and_never_recorded_as_done(slurm_env, tmp_path, monkeypatch):
    # a config error is refused before sbatch now (check_run_config): what fails on the node is the node's world,
    # here a train split that is gone by the time the job starts
    repo = make_tiny_repo(tmp_path / "repo", {"bad": {}}, epochs=1, per_class=8, launcher=slurm_launcher(tmp_path))
    shutil.rmtree(repo / "images" / "train")
    t0 = time.time()
    (record,) = launch_rows(["bad"], workdir=repo)
    slurm_env.append(record.job_id)
    status = rec.wait(record, poll_s=1)
    timing("failing row: submit -> FAILED", time.time() - t0)
    assert status.phase == "failed" and "images/train" in status.detail, status
    assert "FAILED" in sacct_states(record.job_id, until="FAILED")
    monkeypatch.chdir(repo)  # the DVC stage: says so, resubmits (launcher.kind: slurm), fails again -> stage fails
    with pytest.raises(rec.LaunchError, match=r"resubmitted job \d+ ended FAILED"):
        stage_run_row(repo, "bad")
    timing("failing row: + resubmission -> stage error", time.time() - t0)
    again = rec.read_record(Layout("tiny", repo), "bad")
    slurm_env.append(again.job_id)
    assert again.job_id != record.job_id
    assert not (repo / "metrics" / "tiny" / "rows" / "bad.json").exists()


# ---------------------------------------------------------------------------- tlvit launch + dvc repro
def smoke_repo_with_slurm(dst: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A git + DVC copy of this repository with `preset: smoke` and `launcher.kind: slurm`, committed."""
    def edit(text: str) -> str:
        text = set_preset(text, "smoke")
        text = re.sub(r"^(  kind:) local\b", r"\1 slurm", text, count=1, flags=re.M)
        text = re.sub(r"^(  folder:) \S+", rf"\1 {tmp_path / 'submitit'}", text, count=1, flags=re.M)
        text = re.sub(r"^(    cpus_per_task:) \d+", r"\1 1", text, count=1, flags=re.M)
        text = re.sub(r"^(    timeout_min:) \d+", r"\1 60", text, count=1, flags=re.M)
        # 8 epochs, not the smoke preset's 2: the jobs must still be running while the test checks
        # `tlvit launch`, `tlvit status` and that `dvc repro` waits (2-epoch jobs finished first on a quiet machine)
        return re.sub(r"^(      epochs:) 2\n(      warmup_epochs: 1)$", r"\1 8\n\2", text, count=1, flags=re.M)

    return committed_copy(dst, edit, TLVIT_LAUNCH_POLL_S="1")


def test_launch_runs_stale_rows_together_and_dvc_repro_collects_them(slurm_env, tmp_path):
    repo, env = smoke_repo_with_slurm(tmp_path / "repo", tmp_path)
    rows = ["lvvit_s_baseline", "lvvit_s_token_labeling"]
    t0 = time.time()
    sh(["dvc", "repro", "scoremaps"], repo, env)
    timing("launch+repro: upstream stages (dvc repro scoremaps)", time.time() - t0)
    t0 = time.time()
    out = sh(["tlvit", "launch"], repo, env).stdout
    timing("launch+repro: tlvit launch", time.time() - t0)
    records = {r: rec.read_record(Layout("smoke", repo), r) for r in rows}
    assert all(records.values()), out
    slurm_env.extend(r.job_id for r in records.values())
    array_ids = {r.job_id.split("_")[0] for r in records.values()}
    assert len(array_ids) == 1, "all rows go in one submission (an array)"
    (array_id,) = array_ids

    # both rows run at the same time
    deadline, both, q = time.time() + 120, False, ""
    while time.time() < deadline and not both:
        q = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", array_id], capture_output=True, text=True).stdout
        states = dict(line.split() for line in q.splitlines() if line.strip())
        both = all(states.get(r.job_id) == "RUNNING" for r in records.values())
        time.sleep(0.5)
    assert both, f"not both RUNNING in squeue: {q}"
    timing("launch+repro: launch -> both RUNNING", time.time() - t0)

    # a second launch submits nothing while they run; status shows them
    again = sh(["tlvit", "launch"], repo, env).stdout
    assert "nothing to launch" in again and "RUNNING" in again
    status_table = sh(["tlvit", "status"], repo, env).stdout
    assert all(f"{r.job_id} RUNNING" in status_table for r in records.values()), status_table

    # dvc repro waits for the jobs, then records their results without training again
    t1 = time.time()
    repro = sh(["dvc", "repro"], repo, env)
    timing("launch+repro: dvc repro (waits for both jobs, collects, report)", time.time() - t1)
    timing("launch+repro: tlvit launch -> dvc repro done", time.time() - t0)
    log = repro.stdout + repro.stderr
    assert sorted(ran_stages(repro.stdout)) == ["checkpoints", "detection", "reeval", "report", "robustness", "segmentation",
                                               *[f"train@{r}" for r in rows], "transfer"]
    # each stage found its row's job (waiting while it still ran; whether it still did depends on the machine's load)
    assert log.count("completed; collecting its results") == 2
    trained = [line for line in log.splitlines() if re.search(r"epoch \d+: \{", line) and "transfer: " not in line]
    assert not trained, f"dvc repro trained instead of collecting: {trained[:2]}"  # (the transfer stage fine-tunes)
    for row, r in records.items():
        ckpt = repo / "runs" / "smoke" / row / "seed0" / "checkpoint.pt"
        result_pickle = Path(r.folder.replace("%j", r.job_id)) / f"{r.job_id}_0_result.pkl"
        assert ckpt.stat().st_mtime < result_pickle.stat().st_mtime
        assert json.loads((repo / "metrics" / "smoke" / "rows" / f"{row}.json").read_text())["runs"][0]["epochs"] == 8
    lock = (repo / "dvc.lock").read_text()
    assert all(f"train@{r}" in lock for r in rows)
    assert ran_stages(sh(["dvc", "repro"], repo, env).stdout) == []  # all recorded
    final = sh(["tlvit", "status"], repo, env).stdout
    for row, r in records.items():
        line = next(line for line in final.splitlines() if line.startswith(row + " "))
        assert "up to date" in line and f"{r.job_id} COMPLETED" in line and re.search(r"[0-9a-f]{32}", line), final
        assert re.search(rf"\d+\.\d\d\s+\S+/{r.job_id}_0_log\.err\s*$", line), final  # top-1, then the job's log
    from mlflow.tracking import MlflowClient  # one MLflow run per row, one point per epoch (none lost, none doubled)

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # not the report's copies in other tables, nor the transfer, segmentation and detection fine-tunes (in their own
    # experiments)
    fine_tunes = [r for r in everything if "transfer_task" in r.data.tags]
    segmenters = [r for r in everything if "segmentation_head" in r.data.tags]
    assert sorted(r.data.tags["row"] for r in segmenters) == sorted(f"{row}+{h}" for row in rows for h in ("fcn", "upernet"))
    detectors = [r for r in everything if "detection_head" in r.data.tags]
    assert sorted(r.data.tags["row"] for r in detectors) == sorted(f"{row}+mask_rcnn" for row in rows)
    everything = [r for r in everything if r not in segmenters and r not in detectors]
    runs = [r for r in everything if "tlvit.mirror_of" not in r.data.tags and r not in fine_tunes]
    assert sorted(r.data.tags["row"] for r in runs) == rows
    assert sorted(r.data.tags["row"] for r in fine_tunes) == [f"{row}@digits" for row in rows]
    assert {r.data.tags["tlvit.mirror_of"] for r in everything if r not in runs + fine_tunes} <= {r.info.run_id for r in runs}
    for r in runs:
        tags = r.data.tags  # array tasks: the array's id and the task's index (SLURM_JOB_ID is the task's own id)
        assert r.info.status == "FINISHED" and f"{tags['slurm_array_job_id']}_{tags['slurm_array_task_id']}" == records[tags["row"]].job_id
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")] == list(range(1, 9))


# ---------------------------------------------------------------------------- preemption
def test_interrupted_job_requeues_and_ends_like_an_uninterrupted_one(slurm_env, tmp_path):
    """Rows a and b have the same config (same hash, separate run folders): both train at once; a is
    interrupted (USR2, as on preemption) after its first epoch, requeues and resumes from its checkpoint."""
    import submitit

    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "b": {}}, epochs=4, per_class=64, launcher=slurm_launcher(tmp_path))
    t0 = time.time()
    ra, rb = launch_rows(["a", "b"], workdir=repo)
    slurm_env.extend([ra.job_id, rb.job_id])
    ckpt_a = repo / "runs" / "tiny" / "a" / "seed0" / "checkpoint.pt"
    deadline = time.time() + 180
    while checkpoint_epoch(ckpt_a) < 1 and time.time() < deadline:
        time.sleep(0.2)
    epoch_at_interrupt = checkpoint_epoch(ckpt_a)
    assert 1 <= epoch_at_interrupt < 4, "interrupt must land mid-training"
    submitit.SlurmJob(folder=ra.folder, job_id=ra.job_id)._interrupt()
    t_int = time.time()
    sa, sb = rec.wait(ra, poll_s=1), rec.wait(rb, poll_s=1)
    timing("requeue: interrupt -> requeued job done", time.time() - t_int)
    timing("requeue: whole test jobs", time.time() - t0)
    assert sa.phase == "done" and sb.phase == "done", sa.detail + sb.detail
    log = job_log(ra)
    assert "Requeued" in log or "requeue" in log.lower(), log[-3000:]
    assert f"from epoch {epoch_at_interrupt}" in log, "the requeued job resumed from its checkpoint"
    assert "REQUEUED" in sacct_states(ra.job_id), sacct_states(ra.job_id)
    res = {r: json.loads((repo / "runs" / "tiny" / r / "seed0" / "result.json").read_text()) for r in "ab"}
    for key in ("top1", "top5", "top1_raw", "top1_ema", "epochs", "config_hash"):
        assert res["a"][key] == res["b"][key], key
    for key in ("train_loss", "val_top1", "ema_val_top1", "lr"):
        assert res["a"]["curves"][key] == res["b"]["curves"][key], key
    sd = {r: torch.load(repo / "runs" / "tiny" / r / "seed0" / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
          for r in "ab"}
    assert all(torch.equal(sd["a"][k], sd["b"][k]) for k in sd["a"]), "weights differ from the uninterrupted run"


# ---------------------------------------------------------------------------- DDP across tasks
def test_two_task_cpu_ddp_job(slurm_env, tmp_path):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}}, epochs=2, per_class=32,
                          launcher=slurm_launcher(tmp_path, tasks_per_node=2))
    record, status = launch_and_wait(repo, slurm_env, "2-task DDP: submit -> COMPLETED")
    assert status.phase == "done", status.detail
    result = json.loads((repo / "runs" / "tiny" / "a" / "seed0" / "result.json").read_text())
    assert result["global_batch"] == 32 and result["complete"]  # batch_size is the global batch: 16 per rank
    assert "rank 0 of 2" in job_log(record, 0) and "rank 1 of 2" in job_log(record, 1)
    metrics = json.loads((repo / "metrics" / "tiny" / "rows" / "a.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{32}", metrics["runs"][0]["mlflow_run_id"] or "")  # rank 0's view


# ---------------------------------------------------------------------------- MLflow server outage
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback with a SQLite store; stop() ends its whole process group."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120) -> float:
        t0 = time.time()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "mlflow-server.log", "a")
        self.proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                                      "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"],
                                     cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() - t0 < timeout:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return time.time() - t0
            except OSError:
                assert self.proc.poll() is None, (self.root / "mlflow-server.log").read_text()[-3000:]
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with_children = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in with_children:  # uvicorn's worker, should it outlive its parent
            os.kill(int(pid), signal.SIGKILL)


def test_mlflow_outage_loses_no_metric(slurm_env, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path, _free_port())
    epochs = 20
    try:
        timing("mlflow: server start", server.start())
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # the job inherits it through sbatch
        repo = make_tiny_repo(tmp_path / "repo", {"a": {}}, epochs=epochs, per_class=48, launcher=slurm_launcher(tmp_path))
        run_dir = repo / "runs" / "tiny" / "a" / "seed0"
        (record,) = launch_rows(["a"], workdir=repo)
        slurm_env.append(record.job_id)
        client = MlflowClient(server.uri)
        deadline = time.time() + 180
        while time.time() < deadline:  # the first epoch reached the server
            if (run_dir / "mlflow_run_id").is_file() and client.get_metric_history((run_dir / "mlflow_run_id").read_text().strip(), "val_top1"):
                break
            time.sleep(0.5)
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        server.stop()
        t_down = time.time()
        buffer = run_dir / "tracking_buffer.jsonl"
        while not buffer.is_file() and time.time() - t_down < 120:  # training goes on, metrics buffered
            time.sleep(0.3)
        assert buffer.is_file() and rec.poll(record).phase == "active", "job ended before the outage was seen"
        restart_s = server.start()
        timing("mlflow: outage (stop -> healthy again)", time.time() - t_down)
        timing("mlflow: server restart", restart_s)
        status = rec.wait(record, poll_s=1)
        assert status.phase == "done", status.detail
        log = job_log(record)
        assert "unreachable" in log and "reachable again; buffered metrics sent" in log, \
            "the job ended before the server was back: raise `epochs`"
        assert not buffer.exists()
        for key in ("val_top1", "train_loss", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, epochs + 1)), (key, steps)
        assert client.get_run(run_id).info.status == "FINISHED"
        out = subprocess.run([str(BIN / "tlvit"), "sync"], cwd=repo, capture_output=True, text=True).stdout
        assert "0 not synced" in out  # nothing left behind
    finally:
        server.stop()


def test_a_request_larger_than_any_node_is_refused_from_sinfo(slurm_cluster):
    """The default cpus_per_task (10) on this 2-CPU node would queue forever; the real sinfo says so first."""
    from tlvit.config import ConfigError
    from tlvit.launch.executor import SlurmOptions, check_fits_cluster

    check_fits_cluster(SlurmOptions(cpus_per_task=1))
    check_fits_cluster(SlurmOptions(cpus_per_task=1, gpus_per_node=2))  # the node's 2 fake GPUs, one rank each
    cpus = os.cpu_count()
    with pytest.raises(ConfigError, match=rf"largest node of the default partition has \d+ CPUs"):
        check_fits_cluster(SlurmOptions(cpus_per_task=cpus * 8))
    with pytest.raises(ConfigError, match="gpus_per_node"):
        check_fits_cluster(SlurmOptions(cpus_per_task=1, gpus_per_node=4, tasks_per_node=None))


def _listening(port: int) -> set[str]:
    """Local addresses (dotted IPv4, or `[ipv6]`) with a TCP socket listening on `port` (from /proc/net/tcp*)."""
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            if v6:
                out.add(f"[{addr}]")
            else:
                out.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
    return out


def test_the_single_node_daemons_listen_on_loopback_only(slurm_cluster):
    """slurmctld (6817), slurmd (6818) and MariaDB (3307) bind 127.0.0.1, not every interface. slurmdbd (6819) is
    the exception: Slurm 22.05's slurmdbd has no listen-address option (its CommunicationParameters know only
    IPv4/IPv6 and keep-alive settings); it answers only requests carrying a munge credential of this node's key."""
    for port in (6817, 6818, 3307):
        addrs = _listening(port)
        assert addrs, f"nothing listens on {port}"
        assert addrs <= {"127.0.0.1"}, f"port {port} listens on {addrs}"
