"""The optimizer step and bookkeeping that the segmentation and detection fine-tunes share (tlvit.iteration_runs)."""
from __future__ import annotations

import pytest
import torch

from tlvit.iteration_runs import IterationRun

CFG = {"row": "tiny", "lr": 0.1, "weight_decay": 0.0}


class Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def _run(tmp_path, cfg=CFG):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    run = IterationRun(cfg, 0, tmp_path / "run", device="cpu")
    optimizer, start, rng = run.begin(model, tracking=False, experiment="x", tags=None)
    run.tracker = Recorder()
    return run, model, optimizer, start, rng


def _loss(model):
    return model(torch.ones(2, 3)).pow(2).mean()


def test_a_non_finite_loss_stops_the_run_before_the_weights_move(tmp_path):
    run, model, optimizer, _, _ = _run(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"run: loss nan at iteration 7"):
        run.step(model, optimizer, _loss(model) * float("nan"), 7, lr=0.1, stop=10, every=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not run.ckpt_path.exists()


def test_step_uses_the_given_lr_logs_every_50th_and_the_last_and_checkpoints_every_nth_and_the_last(tmp_path):
    run, model, optimizer, start, rng = _run(tmp_path)
    assert (start, rng) == (0, None)
    it, saved = start, []
    while it < 53:
        it = run.step(model, optimizer, _loss(model), it, lr=0.01 * (it + 1), stop=53, every=20,
                      parts={"part": torch.tensor(2.0)})
        if run.ckpt_path.exists():
            saved.append(torch.load(run.ckpt_path, weights_only=True)["iteration"])
            run.ckpt_path.unlink()
    assert it == 53
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.53)
    assert [step for step, _ in run.tracker.logged] == [50, 53]
    assert run.tracker.logged[-1][1]["lr"] == pytest.approx(0.53) and run.tracker.logged[-1][1]["part"] == 2.0
    assert saved == [20, 40, 53]


def test_begin_resumes_this_configs_checkpoint_and_sets_another_configs_aside(tmp_path):
    run, model, optimizer, _, _ = _run(tmp_path)
    it = 0
    for _ in range(3):
        it = run.step(model, optimizer, _loss(model), it, lr=0.1, stop=3, every=3)
    resumed, model2, _, start, rng = _run(tmp_path)
    assert start == 3 and rng is not None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))

    other, _, _, start, rng = _run(tmp_path, {**CFG, "lr": 0.2})
    assert (start, rng) == (0, None)
    assert (other.run_dir / f"checkpoint.pt.{resumed.chash}.superseded").is_file()
    assert not other.ckpt_path.exists()
