"""The embedded dataset: deterministic, disjoint train/val digits, ground truth consistent with pixels."""
import shutil

import numpy as np
import pytest
from PIL import Image

from tlvit.data.canvases import BACKGROUND, CanvasSpec, load_gt_maps, load_source_digits, write_canvases
from tlvit.data.datasets import DatasetError, index_split
from tlvit.io import tree_digest as digest

SPEC = CanvasSpec(train=60, val=20, single=20, composed=30, seed=3)


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


def test_the_digest_later_stages_depend_on_sees_every_change(canvases, tmp_path):
    """dataset.json's digest stands for the whole tree in dvc.yaml: a changed byte, a renamed (relabelled)
    or a removed image must each change it; the excluded name must not."""
    copy = tmp_path / "copy"
    shutil.copytree(canvases, copy)
    (copy / "dataset.json").write_text("{}")
    base = digest(copy, exclude=("dataset.json",))
    assert base == digest(canvases)
    image = sorted((copy / "train").rglob("*.png"))[0]
    original = image.read_bytes()
    changed = bytearray(original)
    changed[-20] ^= 1
    image.write_bytes(bytes(changed))
    assert digest(copy, exclude=("dataset.json",)) != base
    image.write_bytes(original)
    assert digest(copy, exclude=("dataset.json",)) == base
    other_class = "1" if image.parent.name != "1" else "2"
    image.rename(image.parent.parent / other_class / image.name)
    assert digest(copy, exclude=("dataset.json",)) != base
    (image.parent.parent / other_class / image.name).unlink()
    assert digest(copy, exclude=("dataset.json",)) != base


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


def test_composed_split_is_new_canvases_of_train_digits_and_leaves_the_others_unchanged(canvases, tmp_path):
    """The annotator's composed canvases: multi-digit like `train`, but other compositions; adding the
    split changes no byte of the other splits (each split draws from its own stream)."""
    paths, maps, labels = load_gt_maps(canvases, "composed")
    assert len(paths) == 30 and maps.shape[1:] == (64, 64)
    assert all(len(set(np.unique(gt)) - {BACKGROUND}) >= 2 for gt in maps)
    _, train_maps, _ = load_gt_maps(canvases, "train")
    assert not any((m == t).all() for m in maps for t in train_maps)
    without = tmp_path / "without"
    write_canvases(without, CanvasSpec(train=60, val=20, single=20, composed=0, seed=3))
    assert not (without / "composed").exists()
    for split in ("train", "val", "single"):
        assert digest(without / split) == digest(canvases / split)


def test_cell_targets_name_the_digit_with_most_ink_and_ignore_background():
    from tlvit.labels.annotator import IGNORE, cell_targets

    gt = np.full((1, 8, 8), BACKGROUND, np.uint8)
    gt[0, 0:2, 0:3] = 3  # top-left cell: 6 pixels of a 3 ...
    gt[0, 0, 3] = 5      # ... and 1 of a 5
    gt[0, 4:8, 4:8] = 7  # bottom-right: 15 pixels of a 7 and 1 of a 2
    gt[0, 5, 5] = 2
    gt[0, 7, 0] = 4      # bottom-left: a single pixel of a 4 still labels its cell
    assert cell_targets(gt, (2, 2)).tolist() == [[[3, IGNORE], [4, 7]]]
    with pytest.raises(ValueError, match="whole cells"):
        cell_targets(gt, (3, 3))


def test_gt_maps_listing_other_images_stop_with_the_file_and_the_fix(canvases):
    rel, _, _ = index_split(canvases, "train")
    paths, _, _ = load_gt_maps(canvases, "train", expect_paths=rel)
    assert paths == rel
    with pytest.raises(DatasetError, match=r"gt_maps_train\.npz: lists other images.*dvc repro --force data"):
        load_gt_maps(canvases, "train", expect_paths=rel[1:] + rel[:1])  # same images, another order
    with pytest.raises(DatasetError, match=r"gt_maps_train\.npz"):
        load_gt_maps(canvases, "train", expect_paths=rel[:-1])


def test_tune_split_is_carved_from_train_digits_and_changes_nothing_without_it(canvases, tmp_path):
    """The tuning split's digits are held out of train (and of the annotator's splits); val stays unseen; with
    tune_digits_per_class 0 (every existing preset) no byte of any split changes."""
    pools = load_source_digits(400, 50)
    tune = {d.tobytes() for cls in pools["tune"] for d in cls}
    assert [len(c) for c in pools["train"]] == [350] * 10 and [len(c) for c in pools["tune"]] == [50] * 10
    assert not tune & {d.tobytes() for split in ("train", "val") for cls in pools[split] for d in cls}
    assert [len(c) for c in load_source_digits(400)["train"]] == [400] * 10
    tuned = tmp_path / "tuned"
    write_canvases(tuned, CanvasSpec(train=60, val=20, single=20, composed=30, tune=25, tune_digits_per_class=50, seed=3))
    assert digest(tuned / "val") == digest(canvases / "val")  # val: the same canvases as without a tune split
    assert digest(tuned / "train") != digest(canvases / "train")  # train: 350 digits a class instead of 400
    paths, maps, labels = load_gt_maps(tuned, "tune")
    assert len(paths) == 25 and maps.shape[1:] == (64, 64)
    with pytest.raises(ValueError, match="tune_digits_per_class"):
        write_canvases(tmp_path / "bad", CanvasSpec(train=6, val=2, single=0, tune=5, seed=3))


def test_a_run_evaluates_on_the_tune_split_when_its_preset_says_so(tmp_path):
    from tlvit.data.datasets import val_split

    root = tmp_path / "c"
    write_canvases(root, CanvasSpec(train=20, val=10, single=0, tune=12, tune_digits_per_class=20, seed=1))
    cfg = {"img_size": 64, "crop_pct": 1.0}
    assert len(val_split(cfg, root, "canvases")) == 10
    assert len(val_split({**cfg, "eval_split": "tune"}, root, "canvases")) == 12
    with pytest.raises(ValueError, match="eval_split"):
        val_split({**cfg, "eval_split": "train"}, root, "canvases")


def test_shifted_and_corrupted_val_splits_leave_the_other_splits_unchanged(canvases, tmp_path):
    """TL-Align Table 6's embedded analogues: the same train/val bytes with or without them; val_a's distractors
    nearly as large as the primary digit; val_r outlines; val_c 15 corruptions x 5 severities of each canvas."""
    root = tmp_path / "shifted"
    write_canvases(root, CanvasSpec(train=60, val=20, single=20, composed=30, seed=3, shifted=12, corrupted=2))
    for split in ("train", "val", "single", "composed"):
        assert digest(root / split) == digest(canvases / split)
    for split in ("val_v2", "val_a", "val_r"):
        assert len(index_split(root, split)[0]) == 12
    size = lambda cls_map, c: np.ptp(np.nonzero(cls_map == c)[0]) + 1 if (cls_map == c).any() else 0  # noqa: E731
    _, maps, labels = load_gt_maps(root, "val_a")
    _, base_maps, base_labels = load_gt_maps(root, "val_v2")
    gap = lambda ms, ls: np.mean([size(m, l) - max(size(m, c) for c in range(10) if c != l) for m, l in zip(ms, ls)])  # noqa: E731
    assert gap(maps, labels) < gap(base_maps, base_labels) - 2  # distractors closer to the primary's height
    outlined = np.asarray(Image.open(sorted((root / "val_r").rglob("*.png"))[0]))
    ink = outlined > 128
    assert ink.any() and ink.mean() < 0.2  # edges only
    files = sorted((root / "val_c").rglob("*.png"))
    assert len(files) == 15 * 5 * 2
    one = files[0].relative_to(root / "val_c").parts
    assert one[0] == "brightness" and one[1] in {"1", "2", "3", "4", "5"} and len(one) == 4
    assert Image.open(files[0]).mode == "RGB"
