"""`tlvit scoremaps` on any ImageFolder: one process, two concurrent shards, ViT annotators."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from test_score_maps import make_imagefolder
from tlvit.labels.annotator import build_annotator, dense_logits
from tlvit.labels.score_maps import ScoreMapStore

TLVIT = [sys.executable, "-m", "tlvit.cli"]


def test_concurrent_shards_write_the_store_one_process_writes(tmp_path):
    root = make_imagefolder(tmp_path / "data", n_per_class=20)  # 40 images, 3 chunks of 16
    torch.manual_seed(0)
    ckpt = tmp_path / "ann.pth"
    torch.save(build_annotator("annotator_cnn", num_classes=2).state_dict(), ckpt)
    base = ["scoremaps", "--data", str(root), "--annotator", "annotator_cnn", "--checkpoint", str(ckpt),
            "--input-size", "32", "--batch-size", "8"]
    one = subprocess.run(TLVIT + base + ["--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert "40 images, grid (8, 8), top-2" in one.stdout
    # two concurrent processes on one store: creation under the lock, one publishes (the chunk split itself
    # is checked below with small chunks; the CLI's are 512 images)
    shards = [subprocess.Popen(TLVIT + base + ["--out", str(tmp_path / "two"), "--shard", f"{i}/2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in shards]
    assert all(p.returncode == 0 for p in shards), outs
    a, b = ScoreMapStore(tmp_path / "one"), ScoreMapStore(tmp_path / "two")
    assert a.index["paths"] == b.index["paths"]
    assert np.array_equal(a.classes, b.classes) and np.array_equal(a.logits, b.logits)


def test_shards_split_chunks_and_the_last_one_publishes(tmp_path):
    from tlvit.data.datasets import DenseLabelDataset, WholeImageGeometry
    from tlvit.labels.annotator import generate_score_maps

    root = make_imagefolder(tmp_path / "data", n_per_class=10)
    model = build_annotator("annotator_cnn", num_classes=2)
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    kw = dict(k=2, batch_size=4, meta={"annotator": "t"}, chunk=4)
    assert generate_score_maps(model, ds, tmp_path / "s", shard=1, num_shards=2, **kw) is None  # chunks 1, 3
    assert not (tmp_path / "s").exists()
    store = generate_score_maps(model, ds, tmp_path / "s", shard=0, num_shards=2, **kw)  # chunks 0, 2, 4
    assert store is not None and len(store) == 20
    ref = generate_score_maps(model, ds, tmp_path / "ref", **kw)
    assert np.array_equal(store.classes, ref.classes)


def test_vit_annotator_uses_its_token_head(tmp_path):
    import timm

    import tlvit.models  # noqa: F401

    model = timm.create_model("lvvit_e", num_classes=3, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = dense_logits(model, x)
    assert maps.shape == (2, 3, 8, 8)
    tokens = model.forward_train(x).token_logits  # [B, 64, 3], row-major over the 8x8 grid
    assert torch.allclose(maps[:, :, 2, 5], tokens[:, 2 * 8 + 5], atol=1e-5)
