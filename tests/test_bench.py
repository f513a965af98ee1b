"""`tlvit bench`: every benchmark runs in --quick mode and writes well-formed JSON; the ✓/✗ logic is right.

No timing assertions: speed targets live in the benchmark output (docs/benchmarks.md), not in tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlvit.bench import common
from tlvit.bench.common import Target, all_met, interleave, paired_ratios, summary, targets_table

PROVENANCE = ("benchmark", "status", "quick", "date", "commit", "machine", "device", "torch", "settings", "results",
              "targets", "all_targets_met", "notes")


def load_record(out: Path, name: str) -> dict:
    record = json.loads((out / f"{name}.json").read_text())
    missing = [k for k in PROVENANCE if k not in record]
    assert not missing, missing
    assert record["benchmark"] == name and record["quick"] is True
    assert record["date"][:4].isdigit() and record["torch"] and record["commit"]
    assert {"hostname", "cpu", "cores", "load_1m_max", "shared"} <= set(record["machine"])
    for t in record["targets"]:
        assert {"name", "value", "op", "threshold", "met"} <= set(t)
        assert t["met"] is None or t["met"] == (t["value"] <= t["threshold"] if t["op"] == "<=" else t["value"] >= t["threshold"])
    return record


# ---------------------------------------------------------------------------------------------- logic
@pytest.mark.parametrize("value, op, threshold, met, mark", [
    (1.04, "<=", 1.05, True, "✓"), (1.05, "<=", 1.05, True, "✓"), (1.0501, "<=", 1.05, False, "✗"),
    (0.96, ">=", 0.95, True, "✓"), (0.95, ">=", 0.95, True, "✓"), (0.9499, ">=", 0.95, False, "✗"),
    (None, "<=", 3.0, None, "–"),
])
def test_target_met_and_mark(value, op, threshold, met, mark):
    t = Target("x", value, op, threshold)
    assert t.met is met and t.mark == mark
    assert t.as_dict()["met"] is met


def test_target_rejects_unknown_op():
    with pytest.raises(ValueError, match="op"):
        Target("x", 1.0, "<", 1.0)


def test_all_met_ignores_unmeasured():
    ok, missed, unmeasured = Target("a", 1.0, "<=", 2.0), Target("b", 3.0, "<=", 2.0), Target("c", None, ">=", 1.0)
    assert all_met([ok, unmeasured]) is True
    assert all_met([ok, missed, unmeasured]) is False
    assert all_met([unmeasured]) is None and all_met([]) is None


def test_targets_table_marks_each_row():
    table = targets_table([Target("token labeling", 1.02, "<=", 1.05), Target("TL-Align", 1.04, "<=", 1.01)])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert rows == [["token labeling", "1.0200×", "<= 1.05×", "✓"], ["TL-Align", "1.0400×", "<= 1.01×", "✗"]]


def test_interleave_rotates_the_order_and_warms_up():
    calls = []
    fns = {name: (lambda n=name: calls.append(n) or 1.0) for name in "abc"}
    samples = interleave(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert samples == {n: [1.0, 1.0, 1.0] for n in "abc"}


def test_paired_ratios_median_and_quartiles():
    r = paired_ratios([2.0, 3.0, 12.0], [2.0, 2.0, 4.0])
    assert r == [1.0, 1.5, 3.0]
    s = summary(r)
    assert s["median"] == 1.5 and s["n"] == 3 and s["q25"] == 1.25 and s["q75"] == 2.25
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


@pytest.mark.parametrize("load, shared", [(1.5, False), (2.0, False), (3.7, True), (None, False)])
def test_machine_shared_when_load_exceeds_cores(monkeypatch, load, shared):
    monkeypatch.setattr(common, "cpu_cores", lambda: 2)
    info = common.machine_info([0.5, load])
    assert info["shared"] is shared and info["cores"] == 2


def test_shared_machine_is_said_in_output_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "cpu_cores", lambda: 2)
    monkeypatch.setattr(common, "load_1m", lambda: 5.0)
    bench = common.Bench("unit", tmp_path, quick=True)
    record = bench.finish(settings={}, results={}, targets=[Target("t", 1.0, "<=", 2.0)], tables=["| a |"])
    out = capsys.readouterr().out
    assert "machine shared" in out and "✓" in out
    assert record["machine"]["shared"] is True and any("machine shared" in n for n in record["notes"])
    assert json.loads((tmp_path / "unit.json").read_text())["all_targets_met"] is True


# ---------------------------------------------------------------------------------------------- each benchmark, quick
def test_step_quick(tmp_path):
    from tlvit.bench import step

    rec = load_record(tmp_path, step.run(tmp_path, quick=True, device="cpu")["benchmark"])
    assert set(rec["results"]) == {v.key for v in step.VARIANTS}
    for v in step.VARIANTS:
        res = rec["results"][v.key]
        assert res["step_wall_s"]["median"] > 0 and res["step_cpu_s"]["median"] > 0 and res["images_per_s"] > 0
        assert ("ratio_cpu" in res) == (v.reference is not None)
    names = [t["name"] for t in rec["targets"]]
    assert any("token labeling" in n for n in names) and any("TL-Align" in n for n in names)
    assert rec["settings"]["amp_dtype"] is None  # the CPU trains in float32, as tlvit.train does


def test_step_runner_is_the_training_state_train_builds():
    import torch

    from tlvit.bench.step import StepRunner, Variant, default_paths, variant_config
    from tlvit.train import build_training_state

    cfg = variant_config(Variant("tl", "tl", "lvvit_s_token_labeling"), "smoke", *default_paths())
    cpu = torch.device("cpu")
    runner = StepRunner(cfg, 10, 8, cpu)
    ref = build_training_state(cfg, 10, cpu, global_batch=8, steps_per_epoch=1000, seed=0)
    assert type(runner.state) is type(ref) and runner.state.lr == ref.lr and runner.state.supervision == ref.supervision
    assert {k: v for k, v in runner.state.step_kwargs().items() if k != "ema"} == \
        {k: v for k, v in ref.step_kwargs().items() if k != "ema"}
    ours, theirs = runner.state.model.state_dict(), ref.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_step_batches_match_the_loader_format():
    from tlvit.bench.step import synthetic_batches

    (b,) = synthetic_batches(1, 4, 64, 10, (16, 16), 5)
    assert b["image"].shape == (4, 3, 64, 64) and b["theta"].shape == (4, 2, 3) and b["clips"].shape == (4, 1, 2, 3)
    assert b["topk_logits"].dtype.itemsize == 2 and b["topk_classes"].shape == (4, 5, 16, 16)
    assert str(b["topk_classes"].dtype) == "torch.uint8"  # the store's class dtype for 10 classes
    top = b["topk_classes"].long()
    assert (top.sort(1).values.diff(dim=1) > 0).all()  # k distinct classes per location


def test_data_and_scoremaps_quick(tmp_path):
    from tlvit.bench import data, scoremaps

    work = tmp_path / "work"
    data.run(tmp_path, quick=True, workdir=work, workers=0)
    rec = load_record(tmp_path, "data")
    assert rec["results"]["cpu"]["ratio"]["median"] > 0 and rec["results"]["score_maps"]["grid"] == [16, 16]
    assert [t["op"] for t in rec["targets"]] == [">="]
    scoremaps.run(tmp_path, quick=True, workdir=work)
    rec = load_record(tmp_path, "scoremaps")
    store = rec["results"]["store"]
    assert store["bytes_per_image"] == 5 * 16 * 16 * (2 + 1)  # fp16 logits + uint8 classes, top-5 on 16x16
    assert rec["results"]["imagenet_computed"]["bytes_per_image"] == 5 * 18 * 18 * (2 + 2)


def test_gpu_skipped_without_gpu_and_runs_on_cpu_when_asked(tmp_path, monkeypatch):
    import torch

    from tlvit.bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rec = gpu.run(tmp_path, quick=True)
    assert rec["status"] == "skipped" and "no GPU: skipped" in rec["notes"]
    load_record(tmp_path, "gpu")
    rec = gpu.run(tmp_path, quick=True, device="cpu", with_step=False, models=(("deit_s", "deit_s_vanilla"),))
    load_record(tmp_path, "gpu")
    res = rec["results"]["deit_s"]
    assert res["model"] == "deit_e" and res["flops_per_step"] > 0  # the smoke preset's DeiT-S stand-in
    assert res["harness"]["images_per_s"] > 0 and res["plain"]["mfu"] is None  # no peak FLOP/s known for a CPU
    assert [t["op"] for t in rec["targets"]] == [">="]


def test_peak_flops_lookup():
    from tlvit.bench.gpu import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None


@pytest.mark.e2e
def test_repro_quick_through_the_cli(tmp_path):
    from tlvit.cli import main

    assert main(["bench", "repro", "--quick", "--out", str(tmp_path)]) == 0
    rec = load_record(tmp_path, "repro")
    smoke = rec["results"]["smoke"]
    assert smoke["stages"] == ["data"] and smoke["noop_s"]["n"] == 1
    assert list(smoke["stage_wall_s"]) == ["data"] and 0 < smoke["stage_wall_s"]["data"] <= smoke["clean_s"]
    log = (tmp_path / "repro-smoke.stages.tsv").read_text().splitlines()
    assert log[0] == "stage\tended_utc\twall_s\toutcome" and [line.split("\t")[0] for line in log[1:]] == ["data"]
    assert log[1].endswith("\tdone")
    assert [t["threshold"] for t in rec["targets"]] == [3.0]  # --quick: no clean-run target, the run is not the preset's


def test_clean_run_targets_apply_only_to_the_run_they_were_set_for():
    from tlvit.bench.repro import clean_target_min

    assert clean_target_min("embedded-full", "cpu", quick=False, all_rows=True) == 480.0
    assert clean_target_min("embedded-full", "gpu", quick=False, all_rows=True) == 60.0
    assert clean_target_min("embedded", "cpu", quick=False, all_rows=False) == 30.0
    assert clean_target_min("embedded-full", "cpu", quick=False, all_rows=False) is None  # two rows, not the full run
    assert clean_target_min("embedded", "cpu", quick=False, all_rows=True) is None  # every row at 30 epochs: ~21 h
    assert clean_target_min("embedded-full", "cpu", quick=True, all_rows=True) is None  # data stage only
    assert clean_target_min("smoke", "cpu", quick=False, all_rows=False) is None
    assert clean_target_min("embedded", "gpu", quick=False, all_rows=False) is None


def _dvc_repo(root: Path, stages: dict[str, str]) -> tuple[Path, dict]:
    """A git + DVC repository whose dvc.yaml has the given `name: cmd` stages (no deps/outs: they always run)."""
    import subprocess

    import yaml
    from repo_copy import tool_env

    env = tool_env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env=env)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: {"cmd": v} for k, v in stages.items()}}, sort_keys=False))
    return root, env


@pytest.mark.e2e
def test_repro_times_each_stage_and_reports_a_failure(tmp_path):
    """Real `dvc repro`: each stage's wall time goes to the stage DVC ran it as, in order; a failing stage raises
    with the end of its output."""
    from tlvit.bench.repro import timed_repro

    repo, env = _dvc_repo(tmp_path, {"short": "sleep 1", "long": "sleep 4", "broken": "echo boom-from-the-stage; exit 3"})
    log = tmp_path / "stages.tsv"
    seconds, walls = timed_repro(repo, env, ["short", "long"], timeout=120, stage_log=log)
    assert list(walls) == ["short", "long"]
    assert 1.0 <= walls["short"] < 4.0 <= walls["long"]  # swapped or merged stages fail this
    assert walls["short"] + walls["long"] <= seconds + 0.2
    assert [line.split("\t")[0] for line in log.read_text().splitlines()] == ["short", "long"]
    with pytest.raises(RuntimeError, match="boom-from-the-stage"):
        timed_repro(repo, env, ["broken"], timeout=120)


@pytest.mark.e2e
def test_repro_timeout_stops_the_running_stage(tmp_path):
    """The timeout kills DVC and the stage it runs (which holds the output pipe), not only DVC."""
    import time

    from tlvit.bench.repro import timed_repro

    repo, env = _dvc_repo(tmp_path, {"stuck": "sleep 60"})
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past 3 s"):
        timed_repro(repo, env, ["stuck"], timeout=3)
    assert time.perf_counter() - t0 < 45  # had only dvc been killed, reading its output would wait for the sleep


@pytest.mark.e2e
def test_a_killed_repro_resumes_and_each_stage_is_timed_over_its_attempts(tmp_path):
    """Killed (SIGTERM, as `kill <pid>` of the benchmark) in its second stage, the stage log keeps the first as done and
    the second as interrupted (timed to its last heartbeat); the next call runs only the second (DVC skips the first)
    and the sum counts both attempts."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tlvit.bench import repro

    (tmp_path / "repo").mkdir()
    repo, env = _dvc_repo(tmp_path / "repo", {})
    stages = {"first": {"cmd": "sleep 1 && echo a > a.txt", "outs": ["a.txt"]},
              "second": {"cmd": "test -f go || sleep 120; echo b > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    log = tmp_path / "stages.tsv"
    log.write_text(repro.STAGE_LOG_HEADER + "\n")
    code = ("import sys; from pathlib import Path; import tlvit.bench.repro as r; from repo_copy import tool_env; "
            "r.HEARTBEAT_S = 0.5; r.timed_repro(Path(sys.argv[1]), tool_env(), [], None, Path(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(repo), str(log)],
                            env={**env, "PYTHONPATH": str(Path(__file__).parent)})
    running, deadline = repro.running_file(log), time.time() + 300  # generous: DVC starts slowly on a loaded machine
    while not (running.exists() and running.read_text().startswith("second")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # a few heartbeats into the second stage
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    assert repro.close_interrupted(log) == "second" and repro.close_interrupted(log) is None
    walls, interrupted = repro.read_stage_log(log)
    assert interrupted == 1 and list(walls) == ["first", "second"]
    assert walls["first"] >= 1.0 and walls["second"] >= 1.0  # the heartbeats (every 0.5 s) timed the killed attempt
    (repo / "go").write_text("")
    _, again = repro.timed_repro(repo, env, [], timeout=600, stage_log=log)
    assert list(again) == ["second"]  # the finished stage is not run again
    total, interrupted = repro.read_stage_log(log)
    assert interrupted == 1 and total["first"] == walls["first"]
    assert total["second"] == pytest.approx(walls["second"] + again["second"], abs=0.11)
    assert [line.split("\t")[3] for line in log.read_text().splitlines()[1:]] == ["done", "interrupted", "done"]


@pytest.mark.e2e
def test_sigterm_to_the_timing_process_stops_the_stage_it_runs(tmp_path):
    """DVC runs in its own process group (so a timeout can kill the stage with it); `kill <pid>` of the benchmark must
    still stop that stage, not leave it running orphaned while a resumed run starts it again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo, env = _dvc_repo(tmp_path, {"stuck": "echo $$ > stage.pid; exec sleep 120"})
    code = ("import sys; from pathlib import Path; from tlvit.bench.repro import timed_repro; "
            "from repo_copy import tool_env; timed_repro(Path(sys.argv[1]), tool_env(), [], None)")
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", code, str(repo)], env={**env, "PYTHONPATH": tests_dir})
    pid_file = repo / "stage.pid"
    deadline = time.time() + 300  # generous: DVC starts slowly on a loaded machine
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    stage = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    for _ in range(300):
        try:
            os.kill(stage, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(stage, signal.SIGKILL)
        pytest.fail("the stage outlived the benchmark process")
    assert rc == 128 + signal.SIGTERM  # it exits as a process ended by SIGTERM does (143)


@pytest.mark.e2e
def test_repro_in_a_kept_workdir_resumes_instead_of_starting_again(tmp_path):
    """--repro-workdir: a second call finds the copy, runs nothing finished and reports the first call's stage times."""
    from tlvit.bench import repro

    first = repro.run(tmp_path / "out", quick=True, presets=("smoke",), noop_repeats=1, workdir=tmp_path / "wd")
    second = repro.run(tmp_path / "out", quick=True, presets=("smoke",), noop_repeats=1, workdir=tmp_path / "wd")
    one, two = first["results"]["smoke"], second["results"]["smoke"]
    assert not one["resumed"] and two["resumed"] and one["copy"] == two["copy"] == str(tmp_path / "wd" / "smoke")
    assert two["stage_wall_s"] == one["stage_wall_s"] and two["clean_s"] == one["stage_wall_s"]["data"]
    assert len((tmp_path / "out" / "repro-smoke.stages.tsv").read_text().splitlines()) == 2  # header + data, once
    # a clone at this checkout's HEAD, so its runs record a commit of this history (params.yaml edited: -dirty)
    import subprocess

    from tlvit.bench.common import SOURCE_ROOT
    from tlvit.provenance import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True).stdout.strip()
    assert git_commit(one["copy"]) == one["copy_commit"] == two["copy_commit"] == head + "-dirty"
    import yaml

    copy = Path(one["copy"])  # the checkout's generated outputs were not cloned: only what the data stage wrote
    assert not (copy / "reports").exists() and list(yaml.safe_load((copy / "dvc.lock").read_text())["stages"]) == ["data"]
    with pytest.raises(RuntimeError, match="repro-smoke.stages.tsv: missing"):
        repro.run(tmp_path / "other", quick=True, presets=("smoke",), noop_repeats=1, workdir=tmp_path / "wd")


@pytest.mark.e2e
def test_repro_all_rows_fills_every_table(tmp_path):
    """--repro-all-rows: the copy's params.yaml lists what `tlvit rows --all --write` would (checked on smoke, data only)."""
    import shutil

    from tlvit.bench import repro
    from tlvit.config import load_params

    rec = repro.run(tmp_path / "out", quick=True, presets=("smoke",), all_rows=True, keep=True)
    res = rec["results"]["smoke"]
    params = load_params(Path(res["copy"]) / "params.yaml")
    shutil.rmtree(res["copy"])  # kept (outside tmp_path) only to read its params
    rows, finetunes = repro.every_table_row("smoke")
    assert params["rows"] == rows and params["finetunes"] == finetunes and params["preset"] == "smoke"
    assert len(rows) + len(finetunes) >= 40 and "lvvit_s_token_labeling_384" in finetunes
    assert res["all_rows"] is True and res["stages"] == ["data"]


def test_segmentation_quick(tmp_path):
    from tlvit.bench import segmentation

    rec = load_record(tmp_path, segmentation.run(tmp_path, quick=True, device="cpu", workdir=tmp_path / "wd")["benchmark"])
    assert set(rec["results"]) == {f"{row}+{head}" for row in segmentation.ROWS for head in ("fcn", "upernet")}
    for res in rec["results"].values():
        assert res["s_per_iteration"] > 0 and res["s_per_val_image"] > 0
        # the fine-tune: the preset's 600 iterations and 2,000 val canvases at the measured rates
        assert res["fine_tune_s"] == pytest.approx(600 * res["s_per_iteration"] + 2000 * res["s_per_val_image"])
    assert {r["model"] for r in rec["results"].values()} == {"lvvit_e", "deit_e", "swin_e", "pvt_e"}


def test_detection_quick(tmp_path):
    from tlvit.bench import detection, segmentation

    rec = load_record(tmp_path, detection.run(tmp_path, quick=True, device="cpu", workdir=tmp_path / "wd")["benchmark"])
    assert set(rec["results"]) == set(segmentation.ROWS)
    for res in rec["results"].values():
        assert res["s_per_iteration"] > 0 and res["s_per_val_image"] > 0
        # the fine-tune: the preset's 600 iterations and 2,000 val canvases at the measured rates
        assert res["fine_tune_s"] == pytest.approx(600 * res["s_per_iteration"] + 2000 * res["s_per_val_image"])
    assert {r["model"] for r in rec["results"].values()} == {"lvvit_e", "deit_e", "swin_e", "pvt_e"}
