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
    assert rec["targets"][0]["threshold"] == 3.0
