"""Cluster launch without a cluster: Slurm options -> submitit arguments (mocked AutoExecutor), launch
records and job states, the wait in `pipeline.train`, offline MLflow buffering, and one row run through
submitit's local executor and then collected without retraining.

`make_tiny_repo` is also used by tests/test_slurm.py.
"""
from __future__ import annotations

import copy
import json
import logging
import pickle
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from PIL import Image

from tlvit.config import ConfigError, config_hash, load_params, resolve_run_config
from tlvit.launch import executor as ex
from tlvit.launch import launcher as launcher_mod
from tlvit.launch import records as rec
from tlvit.launch.executor import LauncherConfig, SlurmOptions, load_launcher_config, make_executor
from tlvit.launch.launcher import DvcStatus, launch_rows, plan_launch
from tlvit.layout import Layout

REPO = Path(__file__).resolve().parents[1]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


# ---------------------------------------------------------------------------- a tiny repository
def make_images(root: Path, per_class: int, val_per_class: int = 8, seed: int = 0) -> Path:
    """A 4-class ImageFolder at 64 px: a coloured square (the class) on noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, colour in enumerate(COLORS):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
                x, y = rng.integers(0, 32, 2)
                a[y : y + 32, x : x + 32] = colour
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def make_tiny_repo(root: Path, rows: dict[str, dict], *, epochs: int = 3, per_class: int = 32,
                   launcher: dict | None = None) -> Path:
    """A working directory the launcher can run rows in: params.yaml (preset `tiny`: the smoke recipe on
    a generated ImageFolder, lvvit_e at 64 px, batch 32), experiments/rows.yaml, data/tiny/dataset.json and
    a copy of pipeline/ (the train@<row> stage, `pipeline.train`, runs from the working directory)."""
    root.mkdir(parents=True, exist_ok=True)
    params = load_params(REPO / "params.yaml")  # the smoke preset over the defaults block
    train = copy.deepcopy(params["presets"]["smoke"]["train"])
    train.pop("variant_of", None)
    train.update(epochs=epochs, batch_size=32, warmup_epochs=1 if epochs > 1 else 0, workers=0, eval_every=1)
    doc = {"preset": "tiny", "rows": list(rows),
           "launcher": launcher or {"kind": "local", "folder": str(root / "submitit")},
           "presets": {"tiny": {"data": {"kind": "imagefolder"}, "train": train, "seeds": [0]}}}
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "experiments").mkdir(exist_ok=True)
    (root / "experiments" / "rows.yaml").write_text(yaml.safe_dump({r: {"overrides": ov} for r, ov in rows.items()}))
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    images = make_images(root / "images", per_class)
    (root / "data" / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "data" / "tiny" / "dataset.json").write_text(json.dumps({"kind": "imagefolder", "root": str(images)}))
    return root


def row_hash(workdir: Path, row: str) -> str:
    params = load_params(workdir / "params.yaml")
    return config_hash(resolve_run_config(params, row, rows_path=workdir / "experiments" / "rows.yaml"))


# ---------------------------------------------------------------------------- options -> submitit
def test_slurm_options_map_to_auto_executor_arguments(tmp_path):
    opts = SlurmOptions(partition="gpu", account="proj", qos="low", constraint="a100", nodes=2, gpus_per_node=8,
                        cpus_per_task=12, mem_gb=480, timeout_min=2880, signal_delay_s=300, max_num_timeout=5,
                        additional_parameters={"exclusive": True, "mail_type": "END"})
    with mock.patch("submitit.AutoExecutor") as auto:
        executor = make_executor(LauncherConfig(kind="slurm", folder=str(tmp_path), slurm=opts), tmp_path / "%j", name="tlvit-x")
    auto.assert_called_once_with(folder=tmp_path / "%j", cluster="slurm", slurm_max_num_timeout=5,
                                 slurm_python=shlex.quote(sys.executable))
    executor.update_parameters.assert_called_once_with(
        name="tlvit-x", nodes=2, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12, mem_gb=480, timeout_min=2880,
        slurm_signal_delay_s=300, slurm_partition="gpu", slurm_account="proj", slurm_qos="low",
        slurm_constraint="a100", slurm_additional_parameters={"exclusive": True, "mail_type": "END"})


def test_cpu_ddp_and_defaults_map_to_tasks_without_gpus(tmp_path):
    with mock.patch("submitit.AutoExecutor") as auto:
        make_executor(LauncherConfig(kind="slurm", slurm=SlurmOptions(tasks_per_node=2, cpus_per_task=1, timeout_min=60)),
                      tmp_path)
    kwargs = auto.return_value.update_parameters.call_args.kwargs
    assert kwargs["tasks_per_node"] == 2 and "gpus_per_node" not in kwargs and kwargs["cpus_per_task"] == 1
    assert not any(k in kwargs for k in ("slurm_partition", "slurm_account", "mem_gb", "slurm_additional_parameters"))
    assert SlurmOptions().ntasks_per_node == 1 and SlurmOptions(gpus_per_node=4).ntasks_per_node == 4


def test_local_kinds_use_submitit_local_or_run_in_process(tmp_path):
    with mock.patch("submitit.AutoExecutor") as auto:
        make_executor(LauncherConfig(kind="submitit-local", slurm=SlurmOptions(tasks_per_node=2)), tmp_path)
    assert auto.call_args.kwargs["cluster"] == "local"
    assert auto.return_value.update_parameters.call_args.kwargs["tasks_per_node"] == 2
    assert isinstance(make_executor(LauncherConfig(kind="local"), tmp_path), ex.InProcessExecutor)


def test_launcher_section_is_checked():
    base = {"presets": {}}
    assert load_launcher_config(base).kind == "local"  # no section: defaults
    cfg = load_launcher_config(load_params(REPO / "params.yaml"), kind="slurm", folder="/cluster/x")  # the repo's section parses
    assert (cfg.kind, cfg.folder) == ("slurm", "/cluster/x")
    cfg = load_launcher_config({"launcher": {"folder": "sub", "slurm": {"nodes": 2, "mem_gb": None, "partition": None}}})
    assert cfg.slurm.nodes == 2 and cfg.folder_path("/repo") == Path("/repo/sub")
    with pytest.raises(ConfigError, match="unknown launcher.slurm key.*gpus"):
        load_launcher_config({"launcher": {"slurm": {"gpus": 2}}})
    # `tlvit launch --slurm cpus_per_task=1`: one launch's override wins over the file, and is checked like it
    from tlvit.launch.cli import _key_value

    cfg = load_launcher_config(load_params(REPO / "params.yaml"), kind="slurm",
                               slurm_overrides=dict([_key_value("cpus_per_task=1"), _key_value("mem_gb=8")]))
    assert (cfg.slurm.cpus_per_task, cfg.slurm.mem_gb, cfg.slurm.timeout_min) == (1, 8, 1440)
    with pytest.raises(ConfigError, match="unknown launcher.slurm key.*cpus\\b"):
        load_launcher_config({}, slurm_overrides={"cpus": 1})
    with pytest.raises(ConfigError, match="launcher.kind"):
        load_launcher_config({"launcher": {"kind": "kubernetes"}})
    with pytest.raises(ConfigError, match="one DDP rank per GPU"):
        load_launcher_config({"launcher": {"slurm": {"gpus_per_node": 4, "tasks_per_node": 2}}})


def test_an_imagenet_preset_on_slurm_without_gpus_warns(caplog):
    params = load_params(REPO / "params.yaml")
    with caplog.at_level(logging.WARNING):
        load_launcher_config(dict(params, preset="embedded"), kind="slurm")
    assert "gpus_per_node is 0" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_launcher_config(dict(params, preset="imagenet"), kind="slurm")
    assert "gpus_per_node is 0 for preset 'imagenet'" in caplog.text and "10 CPU(s) per task" in caplog.text


def test_short_timeouts_warn_about_submitit_counting_preemptions_as_timeouts(caplog):
    with caplog.at_level(logging.WARNING):
        load_launcher_config({"launcher": {"slurm": {"timeout_min": 30}}})
    assert "timeout_min=30 < 50" in caplog.text


def test_folder_must_be_shared_for_multi_node_jobs(tmp_path, caplog):
    multi = LauncherConfig(kind="slurm", folder="/tmp/tlvit-submitit", slurm=SlurmOptions(nodes=2))
    with pytest.raises(ConfigError, match=r"launcher.folder \(/tmp/tlvit-submitit\) is under /tmp.*every node"):
        ex.check_shared(multi, "/home/me/repo")
    with caplog.at_level(logging.WARNING):  # one node: allowed (the node may be this machine), with a warning
        ex.check_shared(LauncherConfig(kind="slurm", folder="/tmp/x"), "/home/me/repo")
    assert "under /tmp" in caplog.text
    ex.check_shared(LauncherConfig(kind="submitit-local", folder="/tmp/x", slurm=SlurmOptions(nodes=2)), "/tmp/r")
    assert ex.node_local_reason("/dev/shm/x") and ex.node_local_reason("/home/someone") is None


# ---------------------------------------------------------------------------- launch records and states
def _record(tmp_path: Path, **kw) -> rec.LaunchRecord:
    base = dict(row="a", preset="tiny", config_hash="h", kind="slurm", job_id="41_0", folder=str(tmp_path / "sub" / "%j"),
                workdir=str(tmp_path), submitted_at=time.time())
    return rec.LaunchRecord(**{**base, **kw})


def test_record_roundtrip_and_result_pickles_decide_the_outcome(tmp_path):
    layout = Layout("tiny", tmp_path)
    r = _record(tmp_path)
    assert rec.write_record(layout, r) == tmp_path / "runs" / "tiny" / "a" / "launch.json"
    assert rec.read_record(layout, "a") == r and rec.read_record(layout, "b") is None
    job_dir = tmp_path / "sub" / "41_0"
    job_dir.mkdir(parents=True)
    (job_dir / "41_0_0_result.pkl").write_bytes(pickle.dumps(("success", {"top1": 1.0})))
    assert rec.poll(r).phase == "done"  # no sacct call needed once the result exists
    (job_dir / "41_0_0_result.pkl").write_bytes(pickle.dumps(("error", "Traceback ...\nValueError: boom")))
    for state in ("FAILED", "UNKNOWN"):  # Slurm will not run it again (or no longer knows it): the pickle's error
        with mock.patch.object(rec, "slurm_state", return_value=state):
            st = rec.poll(r)
        assert (st.phase, st.state) == ("failed", "FAILED") and "ValueError: boom" in st.detail


def test_an_error_pickle_of_a_job_slurm_runs_again_is_not_its_outcome(tmp_path):
    """A requeue's SIGTERM can kill submitit's `scontrol requeue` inside the job after the requeue went through:
    submitit writes that as the job's error, Slurm runs the job again, and the new attempt's result decides."""
    r = _record(tmp_path)
    job_dir = tmp_path / "sub" / "41_0"
    job_dir.mkdir(parents=True)
    err = "subprocess.CalledProcessError: Command '['scontrol', 'requeue', '41_0']' died with <Signals.SIGTERM: 15>."
    (job_dir / "41_0_0_result.pkl").write_bytes(pickle.dumps(("error", err)))
    for state in ("REQUEUED", "PENDING", "RUNNING"):
        with mock.patch.object(rec, "slurm_state", return_value=state):
            assert (rec.poll(r).phase, rec.poll(r).state) == ("active", state)
    (job_dir / "41_0_0_result.pkl").write_bytes(pickle.dumps(("success", {"top1": 1.0})))  # the requeued attempt
    with mock.patch.object(rec, "slurm_state", side_effect=AssertionError("no Slurm query once the job succeeded")):
        assert rec.poll(r).phase == "done"


def test_slurm_states_map_to_phases(tmp_path):
    r = _record(tmp_path)
    for state, phase in [("PENDING", "active"), ("RUNNING", "active"), ("REQUEUED", "active"), ("FAILED", "failed"),
                         ("CANCELLED", "failed"), ("TIMEOUT", "failed"), ("OUT_OF_MEMORY", "failed")]:
        with mock.patch.object(rec, "slurm_state", return_value=state):
            assert rec.poll(r).phase == phase, state
    with mock.patch.object(rec, "slurm_state", return_value="UNKNOWN"):  # sacct lags right after sbatch
        assert rec.poll(r).phase == "active"
        assert rec.poll(_record(tmp_path, submitted_at=time.time() - 3600)).state == "LOST"


def test_wait_polls_until_the_job_leaves_the_queue(tmp_path, capsys):
    states = iter(["PENDING", "RUNNING", "RUNNING", "COMPLETED"])
    with mock.patch.object(rec, "slurm_state", side_effect=lambda *a: next(states)), mock.patch.object(rec.time, "sleep"):
        (tmp_path / "sub" / "41_0").mkdir(parents=True)
        st = rec.wait(_record(tmp_path), poll_s=0)
    assert st.state == "COMPLETED" and st.phase == "failed"  # COMPLETED but no result pickle: never counted as done
    out = capsys.readouterr().out
    assert "waiting for slurm job 41_0 (PENDING)" in out and "(RUNNING)" in out


def test_pipeline_waits_only_for_a_job_of_the_same_config(tmp_path, capsys):
    params = {"preset": "tiny", "launcher": {"kind": "local"}, "presets": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    layout = Layout("tiny", tmp_path)
    assert launcher_mod.await_launched_row("a", "h", params, root=tmp_path) == "none"
    rec.write_record(layout, _record(tmp_path, kind="local", state="COMPLETED"))
    assert launcher_mod.await_launched_row("a", "h", params, root=tmp_path) == "done"
    rec.write_record(layout, _record(tmp_path, kind="local", state="FAILED", error="RuntimeError: x"))
    assert launcher_mod.await_launched_row("a", "h", params, tmp_path / "params.yaml", root=tmp_path) == "failed"
    assert "ended FAILED" in capsys.readouterr().out
    rec.write_record(layout, _record(tmp_path, config_hash="old"))
    with mock.patch.object(rec, "slurm_state", return_value="RUNNING"):
        with pytest.raises(rec.LaunchError, match="still RUNNING with an older config"):
            launcher_mod.await_launched_row("a", "h", params, root=tmp_path)
    with mock.patch.object(rec, "slurm_state", return_value="COMPLETED"):  # an old finished job: ignored
        assert launcher_mod.await_launched_row("a", "h", params, root=tmp_path) == "none"


def test_a_failed_slurm_job_is_resubmitted_once_then_the_stage_fails(tmp_path):
    params = {"preset": "tiny", "launcher": {"kind": "slurm"}, "presets": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rec.write_record(Layout("tiny", tmp_path), _record(tmp_path))
    resubmitted = _record(tmp_path, job_id="42")
    with mock.patch.object(rec, "slurm_state", return_value="FAILED"), \
            mock.patch.object(launcher_mod, "launch_rows", return_value=[resubmitted]) as launch:
        with pytest.raises(rec.LaunchError, match="resubmitted job 42 ended FAILED"):
            launcher_mod.await_launched_row("a", "h", params, tmp_path / "params.yaml", root=tmp_path)
    assert launch.call_args.args[0] == ["a"]


# ---------------------------------------------------------------------------- planning and submitting
def test_plan_launch_needs_upstream_and_skips_up_to_date_or_running_rows(tmp_path):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "b": {"label_smoothing": 0.2}, "c": {}}, per_class=1)
    params = load_params(repo / "params.yaml")
    with pytest.raises(ConfigError, match="dvc repro scoremaps"):
        plan_launch(params, ["a"], repo, "experiments/rows.yaml", "params.yaml", DvcStatus(["a"], ["scoremaps"]))
    rec.write_record(Layout("tiny", repo), _record(repo, row="b", config_hash=row_hash(repo, "b")))
    with mock.patch.object(rec, "slurm_state", return_value="RUNNING"), \
            mock.patch("tlvit.launch.launcher.poll", side_effect=rec.poll):
        submit, skipped = plan_launch(params, ["a", "b", "c"], repo, "experiments/rows.yaml", "params.yaml",
                                      DvcStatus(["b", "c"], []))
    assert submit == ["c"]
    assert dict(skipped) == {"a": "up to date in dvc.lock", "b": "job 41_0 RUNNING"}


def test_a_finetune_waits_for_a_stale_parent(tmp_path):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "b": {"label_smoothing": 0.2}}, per_class=1)
    rows = yaml.safe_load((repo / "experiments" / "rows.yaml").read_text())
    rows["b"]["init_from"] = "a"
    (repo / "experiments" / "rows.yaml").write_text(yaml.safe_dump(rows))
    params = load_params(repo / "params.yaml")
    params["rows"], params["finetunes"] = ["a"], {"b": "a"}
    submit, skipped = plan_launch(params, ["a", "b"], repo, "experiments/rows.yaml", "params.yaml", DvcStatus(["a", "b"], []))
    assert submit == ["a"] and dict(skipped)["b"].startswith("fine-tune of a, which is stale too")
    submit, _ = plan_launch(params, ["a", "b"], repo, "experiments/rows.yaml", "params.yaml", DvcStatus(["b"], []))
    assert submit == ["b"]  # the parent is recorded: its weights exist


def test_dvc_status_parsing(tmp_path):
    from tlvit.launch import launcher

    out = json.dumps({"scoremaps": [{"changed deps": {}}], "train@a": [{"changed outs": {}}]})
    with mock.patch.object(launcher.subprocess, "run", return_value=mock.Mock(returncode=0, stdout=out, stderr="")) as run:
        st = launcher.dvc_status(["a", "b"], tmp_path)
    assert (st.stale_rows, st.stale_upstream) == (["a"], ["scoremaps"])
    assert run.call_args.args[0][-5:] == ["status", "--json", "--with-deps", "train@a", "train@b"]
    out = json.dumps({"finetune@b": [{"changed deps": {}}]})
    with mock.patch.object(launcher.subprocess, "run", return_value=mock.Mock(returncode=0, stdout=out, stderr="")) as run:
        st = launcher.dvc_status(["a", "b"], tmp_path, {"a": None, "b": "a"})
    assert (st.stale_rows, st.stale_upstream) == (["b"], [])
    assert run.call_args.args[0][-2:] == ["train@a", "finetune@b"]


def test_launch_submits_all_rows_in_one_batch_and_records_each(tmp_path):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "b": {"label_smoothing": 0.2}}, per_class=1,
                          launcher={"kind": "slurm", "folder": str(tmp_path / "shared"), "slurm": {"timeout_min": 60}})
    batches = []

    class FakeExecutor:
        def __init__(self):
            self.in_batch, self.n = False, 0

        def batch(self):
            import contextlib

            @contextlib.contextmanager
            def cm():
                self.in_batch = True
                yield
                self.in_batch = False
            return cm()

        def submit(self, job):
            batches.append((self.in_batch, job))
            self.n += 1
            return mock.Mock(job_id=f"77_{self.n - 1}")

    with mock.patch("tlvit.launch.launcher.make_executor", return_value=FakeExecutor()) as make, \
            mock.patch("tlvit.launch.launcher.check_fits_cluster") as fits:  # no cluster to ask here
        records = launch_rows(["a", "b"], workdir=repo)
    assert fits.call_args.args[0].cpus_per_task == 10
    assert make.call_args.args[0].kind == "slurm" and str(make.call_args.args[1]).endswith("-tiny/%j")
    assert [(b, j.row, j.workdir, j.num_threads) for b, j in batches] == [(True, "a", str(repo), 10), (True, "b", str(repo), 10)]
    a = rec.read_record(Layout("tiny", repo), "a")
    assert (a.job_id, a.kind, a.config_hash) == ("77_0", "slurm", row_hash(repo, "a"))
    assert rec.read_record(Layout("tiny", repo), "b").job_id == "77_1" and len(records) == 2


def test_a_row_that_cannot_train_is_refused_before_anything_is_submitted(tmp_path):
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "bad": {"augment.mix": "cutmixx"}}, per_class=1)
    with mock.patch("tlvit.launch.launcher.make_executor") as make:
        with pytest.raises(ConfigError, match=r"row 'bad' cannot train as configured \(ValueError: .*'cutmixx'"):
            launch_rows(["a", "bad"], workdir=repo)
    assert not make.called and rec.read_record(Layout("tiny", repo), "a") is None


def test_row_job_requeues_a_fresh_copy_of_itself():
    from tlvit.launch.job import RowJob

    job = RowJob("a", "/repo", num_threads=2)
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.function is not job and delayed.args == ()
    assert pickle.loads(pickle.dumps(job)) == job


def test_status_table_shows_job_run_and_latest_top1(tmp_path, monkeypatch):
    from tlvit.launch.status import collect, format_table

    repo = make_tiny_repo(tmp_path / "repo", {"a": {}, "b": {"label_smoothing": 0.2}}, per_class=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # no server: values come from files
    layout = Layout("tiny", repo)
    rec.write_record(layout, _record(repo, row="a", kind="local", job_id="local-1-1", state="COMPLETED",
                                     config_hash=row_hash(repo, "a")))
    layout.row_metrics("a").parent.mkdir(parents=True)
    layout.row_metrics("a").write_text(json.dumps({"config_hash": row_hash(repo, "a"), "top1": 91.25, "top1_std": None}))
    (layout.run_dir("a", 0)).mkdir(parents=True)
    (layout.run_dir("a", 0) / "mlflow_run_id").write_text("f" * 32)
    layout.run_dir("b", 0).mkdir(parents=True)  # b is training: only its offline buffer has numbers
    (layout.run_dir("b", 0) / "tracking_buffer.jsonl").write_text(
        "".join(json.dumps({"key": "ema_val_top1", "value": v, "timestamp": 0, "step": s}) + "\n" for s, v in ((1, 40.0), (2, 55.5))))
    table = format_table(collect(workdir=repo, use_dvc=False))
    line_a, line_b = table.splitlines()[2:4]
    assert line_a.split() == ["a", "?", "local-1-1", "COMPLETED", "f" * 32, "91.25", "-"]
    assert line_b.split()[:4] == ["b", "?", "-", "-"] and "55.50 (epoch 2, seed 0)" in line_b
    # a queued Slurm job: squeue's reason, and where its log will be
    import tlvit.launch.status as status_mod

    rec.write_record(layout, _record(repo, row="b", kind="slurm", job_id="41_0", config_hash=row_hash(repo, "b")))
    monkeypatch.setattr(status_mod, "poll", lambda record: rec.JobStatus("PENDING", "active"))
    monkeypatch.setattr(status_mod, "pending_reason", lambda job_id: "Resources")
    line_b = format_table(collect(workdir=repo, use_dvc=False)).splitlines()[3]
    assert "41_0 PENDING (Resources)" in line_b and line_b.rstrip().endswith("41_0_0_log.err")


def test_cli_has_launch_status_sync():
    from tlvit.cli import build_parser

    p = build_parser()
    for cmd in ("launch", "status", "sync"):
        assert p.parse_args([cmd]).command == cmd


# ---------------------------------------------------------------------------- tracking offline
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracker_buffers_without_stalling_then_replays_on_reconnect(tmp_path):
    from mlflow.tracking import MlflowClient

    from tlvit.tracking import Tracker

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(tmp_path / "run", "e", "r", {"lr": 1e-3, "model": {"depth": 2}}, {"row": "a"}, uri=store)
    t.log_metrics({"val_top1": 10.0}, step=1)
    t.client, t.uri = None, f"http://127.0.0.1:{_free_port()}"  # the server goes away
    start = time.time()
    t.log_metrics({"val_top1": 20.0}, step=2)
    t.log_metrics({"val_top1": 30.0}, step=3)
    assert time.time() - start < 10, "an unreachable server must not stall training"
    assert len((tmp_path / "run" / "tracking_buffer.jsonl").read_text().splitlines()) == 2
    t.uri = store  # back: the next log reconnects and replays the buffer first
    t.log_metrics({"val_top1": 40.0}, step=4)
    t.finish()
    hist = MlflowClient(store).get_metric_history(t.run_id, "val_top1")
    assert sorted((m.step, m.value) for m in hist) == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert not (tmp_path / "run" / "tracking_buffer.jsonl").exists()


def test_sync_creates_a_run_that_never_reached_the_server(tmp_path):
    from mlflow.tracking import MlflowClient

    from tlvit.tracking import Tracker, sync_run_dir

    run = tmp_path / "run"
    t = Tracker(run, "e", "r-s0", {"lr": 1e-3}, {"row": "a"}, uri=f"http://127.0.0.1:{_free_port()}")
    for step in (1, 2):
        t.log_metrics({"val_top1": 10.0 * step}, step=step)
    t.finish()
    assert t.run_id is None and (run / "tracking_pending.json").is_file()
    (run / "result.json").write_text(json.dumps({"complete": True}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = sync_run_dir(run, uri=store)
    assert res.error is None and res.created and res.metrics_sent == 2 and res.closed
    client = MlflowClient(store)
    r = client.get_run(res.run_id)
    assert r.info.status == "FINISHED" and r.data.params["lr"] == "0.001" and r.data.tags["row"] == "a"
    assert [m.step for m in client.get_metric_history(res.run_id, "val_top1")] == [1, 2]
    again = sync_run_dir(run, uri=store)  # idempotent
    assert (again.created, again.metrics_sent, again.closed, again.error) == (False, 0, False, None)


def test_sync_records_the_created_run_id_where_the_report_reads_it(tmp_path):
    from tlvit.launch.cli import record_run_id

    run = tmp_path / "runs" / "tiny" / "a" / "seed1"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"complete": True, "mlflow_run_id": None}))
    metrics = tmp_path / "metrics" / "tiny" / "rows" / "a.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"row": "a", "runs": [{"seed": 0, "mlflow_run_id": "r0"}, {"seed": 1, "mlflow_run_id": None}]}))
    assert record_run_id(run, "r1") == {str(run / "result.json"), str(metrics.resolve())}
    assert json.loads((run / "result.json").read_text())["mlflow_run_id"] == "r1"
    assert [r["mlflow_run_id"] for r in json.loads(metrics.read_text())["runs"]] == ["r0", "r1"]
    assert record_run_id(run, "r1") == set()  # nothing left to change


def test_credentials_in_the_tracking_uri_reach_no_file_and_no_log(tmp_path, caplog):
    from tlvit.tracking import Tracker, sync_run_dir

    uri = f"http://alice:s3cret@127.0.0.1:{_free_port()}"  # nobody answers: the tracker buffers and warns
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        t = Tracker(run, "e", "r-s0", {"lr": 1e-3}, {"row": "a"}, uri=uri)
        t.log_metrics({"val_top1": 1.0}, step=1)
        t.finish()
        res = sync_run_dir(run, uri=uri)
    assert res.error and "s3cret" not in res.error
    assert "s3cret" not in caplog.text and "127.0.0.1" in caplog.text
    for f in run.iterdir():
        assert "s3cret" not in f.read_text(), f.name


# ---------------------------------------------------------------------------- submitit's local executor, for real
@pytest.mark.e2e
def test_row_through_submitit_local_then_collected_without_retraining(tmp_path, monkeypatch):
    """`tlvit launch` with `kind: submitit-local`; then the DVC stage waits for the job and
    finds the run complete (no training: the checkpoint is not rewritten)."""
    repo = make_tiny_repo(tmp_path / "repo", {"a": {}}, epochs=2, per_class=16,
                          launcher={"kind": "submitit-local", "folder": str(tmp_path / "submitit")})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TLVIT_LAUNCH_POLL_S", "0.5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(repo)
    (record,) = launch_rows(["a"])
    assert record.kind == "submitit-local" and rec.poll(record).phase == "active"

    sys.path.insert(0, str(repo))
    try:
        from pipeline.train import main

        main(["--row", "a"])  # the train@a stage: waits for the job, then collects
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("pipeline.train", None), sys.modules.pop("pipeline", None)
    metrics = json.loads(Layout("tiny", repo).row_metrics("a").read_text())
    assert rec.poll(record).phase == "done"
    ckpt = repo / "runs" / "tiny" / "a" / "seed0" / "checkpoint.pt"
    result_pickle = Path(record.folder.replace("%j", record.job_id)) / f"{record.job_id}_0_result.pkl"
    assert ckpt.stat().st_mtime < result_pickle.stat().st_mtime  # written by the job, not by the collection
    job_result = pickle.loads(result_pickle.read_bytes())[1]
    assert job_result["top1"] == metrics["top1"] and metrics["runs"][0]["epochs"] == 2
    assert metrics["runs"][0]["mlflow_run_id"] == job_result["mlflow_run_ids"][0]  # the same MLflow run


def test_a_request_no_node_can_hold_is_refused_before_sbatch():
    nodes = ex.parse_sinfo("debug*|2|20000|gpu:2(S:0)\nbig|64|512000|gpu:a100:8\nbig|32|256000|(null)\n")
    assert [(n.partition, n.cpus, n.gpus, n.default) for n in nodes] == [("debug", 2, 2, True), ("big", 64, 8, False),
                                                                         ("big", 32, 0, False)]
    reason = ex.unfit_reason(SlurmOptions(cpus_per_task=10), nodes)  # the default: 10 CPUs on a 2-CPU node
    assert "1 task(s) x 10 CPUs = 10 CPUs" in reason
    assert "largest node of the default partition has 2 CPUs" in reason and "cpus_per_task" in reason
    assert ex.unfit_reason(SlurmOptions(cpus_per_task=1, gpus_per_node=2), nodes) is None  # 2 ranks x 1 CPU
    assert "= 4 CPUs" in ex.unfit_reason(SlurmOptions(cpus_per_task=2, gpus_per_node=2), nodes)  # one rank per GPU
    assert ex.unfit_reason(SlurmOptions(partition="big", cpus_per_task=8, gpus_per_node=8), nodes) is None
    assert "gpus_per_node" in ex.unfit_reason(SlurmOptions(partition="big", cpus_per_task=1, gpus_per_node=16), nodes)
    assert "set launcher.slurm.partition" in ex.unfit_reason(SlurmOptions(partition="gpu"), nodes)
    assert "64 GB" not in (ex.unfit_reason(SlurmOptions(cpus_per_task=1, mem_gb=16), nodes) or "")
    assert ex.unfit_reason(SlurmOptions(cpus_per_task=1, mem_gb=64), nodes) is not None
