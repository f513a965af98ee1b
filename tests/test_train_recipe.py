"""DeiT's repeated augmentation and timm's cool-down epochs: data order, lr, exact resume."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import test_train
from repo_copy import REPO
import tlvit.train as train_mod
from test_train import tiny_cfg
from tlvit.distributed import DistEnv
from tlvit.samplers import RepeatedAugSampler, train_sampler
from tlvit.train import build_training_state, train

tiny_data = test_train.tiny_data  # the module's fixture: 96 train / 32 val canvases and an oracle store


class Items:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def epoch_order(n: int, world: int, seed: int, epoch: int, repeats: int = 3) -> list[list[tuple[int, int]]]:
    """Each rank's (index, view) list for one epoch."""
    out = []
    for rank in range(world):
        s = RepeatedAugSampler(Items(n), DistEnv(rank, world, rank), seed, repeats)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


@pytest.mark.parametrize("n,world", [(1000, 1), (1000, 2), (1000, 4), (96, 1), (96, 2)])
def test_repeated_aug_gives_each_sampled_image_three_views_across_ranks(n, world):
    ranks = epoch_order(n, world, seed=0, epoch=0)
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    seen = [iv for r in ranks for iv in r]
    # DeiT keeps the epoch length (rounded down to a multiple of 256 images when there are that many)
    assert len(seen) == (n // 256 * 256 if n >= 256 else n)
    assert len(set(seen)) == len(seen)  # no (image, view) twice
    copies = Counter(i for i, _ in seen)
    assert sum(c != 3 for c in copies.values()) <= 1  # the epoch's cut may split the last image's copies
    for i, c in copies.items():
        assert {v for j, v in seen if j == i} == set(range(c))  # views 0, 1, 2: each copy augmented its own way
    # the copies of an image sit next to each other in the global order, so with several ranks they
    # land on different ranks (DeiT's point); the global order itself does not depend on the world size
    single = epoch_order(n, 1, seed=0, epoch=0)[0]
    assert [ranks[q % world][q // world] for q in range(len(seen))] == single
    rank_of = {iv: r for r, order in enumerate(ranks) for iv in order}
    assert all(len({rank_of[(i, v)] for v in range(c)}) == min(c, world) for i, c in copies.items())


def test_repeated_aug_order_is_a_function_of_seed_epoch_and_rank():
    a = epoch_order(1000, 2, seed=0, epoch=5)
    assert a == epoch_order(1000, 2, seed=0, epoch=5)  # a resumed run sees the same data
    assert a != epoch_order(1000, 2, seed=0, epoch=6)
    assert a != epoch_order(1000, 2, seed=1, epoch=5)  # timm seeds its shuffle with the epoch alone; we add the seed


def test_repeated_aug_config():
    cfg = tiny_cfg()
    assert isinstance(train_sampler(Items(96), cfg, DistEnv(), 0), torch.utils.data.DistributedSampler)  # key absent: off
    assert isinstance(train_sampler(Items(96), dict(cfg, repeated_aug=0), DistEnv(), 0), torch.utils.data.DistributedSampler)
    assert isinstance(train_sampler(Items(96), dict(cfg, repeated_aug=3), DistEnv(), 0), RepeatedAugSampler)
    for bad in (True, 2.5, -1):
        with pytest.raises(ValueError, match="repeated_aug must be 0"):
            train_sampler(Items(96), dict(cfg, repeated_aug=bad), DistEnv(), 0)


def test_each_view_of_an_image_is_augmented_its_own_way(tiny_data):
    from tlvit.data.datasets import DenseLabelDataset, TrainGeometry

    ds = DenseLabelDataset(tiny_data.data_root, "train", TrainGeometry(64, (0.25, 1.0), (0.75, 1.3333), 0.0),
                           (0.1,) * 3, (0.25,) * 3)
    ds.set_epoch(0, 0)
    plain, v0, v1, v2 = ds[7], ds[(7, 0)], ds[(7, 1)], ds[(7, 2)]
    assert torch.equal(plain["image"], v0["image"])  # view 0 = the sample as a run without repeats sees it
    assert not torch.equal(v0["theta"], v1["theta"]) and not torch.equal(v1["theta"], v2["theta"])
    assert v1["index"] == 7 and v1["label"] == plain["label"]
    assert torch.equal(ds[(7, 1)]["image"], v1["image"])  # still a function of (seed, epoch, index, view)


def test_cooldown_schedule_holds_min_lr_after_the_cosine():
    cfg = dict(tiny_cfg(epochs=4), cooldown_epochs=2, warmup_epochs=1)
    state = build_training_state(cfg, 10, torch.device("cpu"), global_batch=32, steps_per_epoch=5, seed=0)
    assert state.num_epochs == 6 == train_mod.scheduled_epochs(cfg)
    lr_at = []
    for t in range(6 * 5 + 1):
        state.scheduler.step_update(t)
        lr_at.append(state.optimizer.param_groups[0]["lr"])
    assert all(lr == cfg["min_lr"] for lr in lr_at[4 * 5:])  # from the end of the cosine to the end of the run
    assert all(lr > cfg["min_lr"] for lr in lr_at[1:4 * 5])
    no_cooldown = build_training_state(dict(cfg, cooldown_epochs=0), 10, torch.device("cpu"), global_batch=32,
                                       steps_per_epoch=5, seed=0)
    assert no_cooldown.num_epochs == 4


def test_cooldown_and_repeated_aug_train_deterministically_and_resume_exactly(tiny_data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    step_lrs: list[float] = []

    def spy(*args, **kwargs):  # the lr of every optimizer step train() takes
        state = build_training_state(*args, **kwargs)
        state.optimizer.register_step_pre_hook(lambda opt, a, k: step_lrs.append(opt.param_groups[0]["lr"]))
        return state

    monkeypatch.setattr(train_mod, "build_training_state", spy)
    cfg = dict(tiny_cfg("token_labeling", mix_token=True, epochs=2), cooldown_epochs=2, repeated_aug=3)
    full = train(cfg, 0, tmp_path / "full", tiny_data, tracking=False, show_progress=False)
    assert full["complete"] and full["epochs"] == 4 and full["curves"]["epoch"] == [1, 2, 3, 4]
    steps = len(step_lrs) // 4  # 96 images, batch 32: 3 steps an epoch
    assert steps == 3 and all(lr == cfg["min_lr"] for lr in step_lrs[2 * steps:])  # the cool-down epochs
    assert all(lr > cfg["min_lr"] for lr in step_lrs[1:2 * steps])  # (the first is warmup_lr)
    assert full["curves"]["lr"][2:] == [cfg["min_lr"]] * 2
    # killed in the cool-down, resumed: bit-identical to the uninterrupted run
    partial = train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False, stop_after_epochs=3)
    assert not partial["complete"] and partial["epochs"] == 3
    resumed = train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False)
    assert resumed["complete"] and resumed["curves"] == full["curves"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # repeated augmentation changes what the model sees (same seed, same schedule)
    plain = train(dict(cfg, repeated_aug=0), 0, tmp_path / "plain", tiny_data, tracking=False, show_progress=False)
    assert plain["curves"]["train_loss"] != full["curves"]["train_loss"]


def test_train_split_follows_the_config_and_is_what_training_and_the_data_benchmark_use(tiny_data, tmp_path, monkeypatch):
    from tlvit.bench import data as bench_data
    from tlvit.data.datasets import train_split

    cfg = dict(tiny_cfg(), rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25, hflip=0.5, crop_scale=[0.3, 0.9])
    ds = train_split(cfg, tiny_data.data_root, tiny_data.data_kind, score_maps=tiny_data.score_maps)
    assert ds.geometry.rand_augment is not None and ds.erasing is not None and ds.store is not None
    assert (ds.geometry.size, ds.geometry.scale, ds.geometry.hflip) == (cfg["img_size"], (0.3, 0.9), 0.5)
    plain = train_split(tiny_cfg(), tiny_data.data_root, tiny_data.data_kind)
    assert plain.geometry.rand_augment is None and plain.erasing is None and plain.store is None
    # the benchmark's two loaders are this split with and without maps, item for item
    fixture = type("F", (), {"root": tiny_data.data_root, "kind": tiny_data.data_kind, "store": tiny_data.score_maps})
    without, with_maps = bench_data.build_datasets(cfg, fixture)
    for d in (ds, without, with_maps):
        d.set_epoch(0, 1)
    assert torch.equal(without[5]["image"], ds[5]["image"]) and torch.equal(with_maps[5]["topk_logits"], ds[5]["topk_logits"])
    assert without.store is None
    # train() builds its split with it (a spy that fails loudly proves the call)
    monkeypatch.setattr(train_mod, "train_split", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("train_split called")))
    with pytest.raises(RuntimeError, match="train_split called"):
        train(tiny_cfg(), 0, tmp_path / "spy-run", tiny_data, tracking=False, show_progress=False)


def test_samples_are_seeded_without_torch_manual_seed(tiny_data, monkeypatch):
    # torch.manual_seed also seeds CUDA, and before CUDA is initialised (a loader worker) it formats a stack
    # trace per call: ~40% of a canvas's loading time. Samples must be seeded through the CPU generator alone.
    from tlvit.data.datasets import train_split

    ds = train_split(dict(tiny_cfg(), hflip=0.5), tiny_data.data_root, tiny_data.data_kind)
    ds.set_epoch(0, 2)
    before = [ds[i] for i in range(4)]
    monkeypatch.setattr(torch, "manual_seed", lambda s: (_ for _ in ()).throw(AssertionError("torch.manual_seed called")))
    torch.default_generator.manual_seed(12345)  # whatever the global state, sample i is a function of (seed, epoch, i)
    after = [ds[i] for i in (3, 2, 1, 0)][::-1]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["theta"], b["theta"]) for a, b in zip(before, after))
    assert not torch.equal(before[0]["theta"], before[1]["theta"])


def test_every_row_has_a_schedule_that_means_what_it_says():
    from tlvit.config import load_params, load_rows, resolve_run_config
    from tlvit.train import check_schedule

    params = load_params(REPO / "params.yaml")
    for preset in ("embedded", "embedded-full", "smoke", "imagenet"):
        for row in load_rows(REPO / "experiments" / "rows.yaml"):
            cfg = resolve_run_config(params, row, preset=preset, rows_path=REPO / "experiments" / "rows.yaml")
            check_schedule(cfg, cfg["batch_size"])


def test_schedules_that_cannot_mean_what_they_say_are_refused():
    from tlvit.config import load_params, resolve_run_config
    from tlvit.train import check_schedule

    cfg = resolve_run_config(load_params(REPO / "params.yaml"), "lvvit_s_baseline", preset="embedded",
                             rows_path=REPO / "experiments" / "rows.yaml")
    with pytest.raises(ValueError, match="warmup_epochs 30 is not shorter than epochs 30"):
        check_schedule(dict(cfg, warmup_epochs=30), 128)
    with pytest.raises(ValueError, match="below min_lr"):
        check_schedule(dict(cfg, lr=1e-6), 128)  # 1e-6 x 8 x 128 / 1024 = 1e-6 < min_lr 1e-5
