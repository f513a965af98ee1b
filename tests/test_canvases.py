"""The embedded dataset: deterministic, disjoint train/val digits, ground truth consistent with pixels."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from tlvit.data.canvases import BACKGROUND, CanvasSpec, load_gt_maps, load_source_digits, write_canvases
from tlvit.data.datasets import index_split

SPEC = CanvasSpec(train=60, val=20, single=20, seed=3)


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("c") / "canvases"
    write_canvases(root, SPEC)
    return root


def test_same_seed_same_bytes_other_seed_differs(canvases, tmp_path):
    again = tmp_path / "again"
    write_canvases(again, SPEC)
    assert digest(again) == digest(canvases)
    other = tmp_path / "other"
    write_canvases(other, CanvasSpec(train=60, val=20, single=20, seed=4))
    assert digest(other) != digest(canvases)


def test_train_and_val_digits_are_disjoint():
    pools = load_source_digits(400)
    seen = {d.tobytes() for cls in pools["train"] for d in cls}
    assert all(d.tobytes() not in seen for cls in pools["val"] for d in cls)
    assert [len(c) for c in pools["val"]] == [100] * 10


def test_imagefolder_layout_and_ground_truth(canvases):
    paths, maps, labels = load_gt_maps(canvases, "train")
    rel, targets, classes = index_split(canvases, "train")
    assert rel == paths and classes == [str(c) for c in range(10)]  # gt rows follow the ImageFolder order
    assert list(labels) == targets
    for i in range(len(paths)):
        gt = maps[i]
        present = set(np.unique(gt)) - {BACKGROUND}
        assert labels[i] in present and len(present) >= 2  # the primary and at least one other digit
        img = np.asarray(Image.open(canvases / "train" / paths[i]))
        assert img.shape == (64, 64)
        assert img[gt != BACKGROUND].min() > 0.2 * 255  # labelled pixels carry ink
        # the primary digit is drawn at primary size (30-36 px; the ink threshold may shave a few rows)
        rows = np.flatnonzero((gt == labels[i]).any(1))
        assert rows[-1] - rows[0] + 1 >= SPEC.primary_size[0] - 4


def test_single_digit_canvases(canvases):
    paths, maps, labels = load_gt_maps(canvases, "single")
    assert maps.shape[1:] == (SPEC.single_canvas_size,) * 2
    for gt, label in zip(maps, labels):
        assert set(np.unique(gt)) - {BACKGROUND} == {label}
