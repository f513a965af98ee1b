"""One code path for 1 and N processes: 2 gloo processes reach the weights 1 process reaches (same global batch)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train import tiny_cfg, tiny_data  # noqa: F401  (fixture)
from tlvit.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg: dict, run_dir: str, inputs) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg, 0, run_dir, inputs, device="cpu", tracking=False, show_progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("repeated_aug", [0, 3])  # DeiT's repeated augmentation: each copy augmented alike in both
def test_two_gloo_processes_match_one_process(tiny_data, tmp_path, repeated_aug):  # noqa: F811
    # deit_e: LayerNorm only (BatchNorm statistics of half-batches would differ); no mixing (a partner
    # is taken inside each process's batch, so mixing pairs differ by construction)
    cfg = tiny_cfg("ce", epochs=2)
    cfg.update(model="deit_e", model_kwargs={"depth": 1, "embed_dim": 24, "num_heads": 2}, batch_size=32,
               rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=repeated_aug)
    torch.set_num_threads(1)
    single = train(cfg, 0, tmp_path / "one", tiny_data, device="cpu", tracking=False, show_progress=False)
    mp.start_processes(_rank, args=(2, free_port(), cfg, str(tmp_path / "two"), tiny_data), nprocs=2,
                       start_method="spawn")
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    # batch_size is the global batch: one config, one identity, whatever the process count (16 per process here)
    assert a["config_hash"] == b["config_hash"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k
    # evaluation is summed over both processes: the same accuracy
    assert abs(b["history"][-1]["val_top1"] - single["top1_raw"]) < 1e-9


def test_batch_size_is_the_global_batch():
    from tlvit.train import process_batch

    assert process_batch({"batch_size": 1024}, 8) == 128 and process_batch({"batch_size": 1024}, 1) == 1024
    with pytest.raises(ValueError, match="global batch and must split evenly over the 3 processes"):
        process_batch({"batch_size": 1024, "row": "r"}, 3)


def _eval_rank(rank: int, world: int, port: int, argv: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tlvit.cli import main

    assert main(argv) == 0
    torch.distributed.destroy_process_group()


def test_tlvit_eval_over_two_gloo_processes_matches_one(tmp_path):
    """`tlvit eval` under torchrun: each process scores a shard; the summed top-1/top-5 and ImageNet-ReaL top-1
    equal one process's (ReaL's left-out images included: they must not count in any shard)."""
    import argparse
    import json

    import numpy as np
    import timm
    from PIL import Image

    from tlvit.evaluate import evaluate_split, load_for_eval

    root, rng = tmp_path / "inet", np.random.default_rng(1)
    for split, n in (("train", 1), ("val", 5)):
        for c, wnid in enumerate(("n01", "n02")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                name = f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG" if split == "val" else f"{wnid}_{i}.JPEG"
                Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / split / wnid / name)
    (tmp_path / "real.json").write_text(json.dumps([[0, 1], [], [0], [1], [1], [0], [1], [], [1], [0]]))
    torch.manual_seed(0)
    ckpt = tmp_path / "lvvit_t.pth"
    torch.save({"state_dict_ema": timm.create_model("lvvit_t", num_classes=2, img_size=32).state_dict(),
                "args": argparse.Namespace(lr=1e-3)}, ckpt)
    one = evaluate_split(load_for_eval(ckpt, 2, "lvvit_t", img_size=32), root, batch_size=2, device="cpu",
                         real_labels=str(tmp_path / "real.json"))
    argv = ["eval", "--checkpoint", str(ckpt), "--model", "lvvit_t", "--img-size", "32", "--data", str(root),
            "--batch-size", "2", "--device", "cpu", "--real-labels", str(tmp_path / "real.json"), "--no-track",
            "--out", str(tmp_path / "two.json")]
    mp.start_processes(_eval_rank, args=(2, free_port(), argv), nprocs=2, start_method="spawn")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for k in ("top1", "top5", "top1_cls", "real_top1"):
        assert two[k] == pytest.approx(one[k], abs=1e-9), k
