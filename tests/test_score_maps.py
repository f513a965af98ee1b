"""Score-map store: format, verification against the dataset, resumable writing, dense conversion."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tlvit.data.datasets import DenseLabelDataset, WholeImageGeometry
from tlvit.labels.annotator import build_annotator, dense_logits, generate_score_maps
from tlvit.labels.score_maps import ScoreMapError, ScoreMapStore, ScoreMapWriter, class_dtype, topk_to_dense


def make_imagefolder(root, n_per_class=3, classes=("a", "b"), size=(24, 16)):
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"{i}.png")
    return root


def write_store(path, paths, k=2, grid=(2, 3), num_classes=5, chunk=2):
    w = ScoreMapWriter(path, num_images=len(paths), k=k, grid=grid, num_classes=num_classes, meta={"annotator": "t"}, chunk=chunk)
    for c in w.pending_chunks():
        r = w.chunk_range(c)
        logits = np.stack([np.full((k, *grid), i, np.float16) for i in r])
        classes = np.zeros((len(r), k, *grid), class_dtype(num_classes))
        w.write_chunk(c, logits, classes)
    return w.finish(paths, [(1, 1)] * len(paths))


def test_class_dtype_is_the_smallest_that_fits():
    assert class_dtype(10) == np.uint8 and class_dtype(1000) == np.int16


def test_store_roundtrip_and_verify(tmp_path):
    store = write_store(tmp_path / "s", ["a/0.png", "a/1.png", "b/0.png"])
    assert len(store) == 3 and store.grid == (2, 3)
    logits, classes = store.read(2)
    assert logits.dtype == np.float16 and logits[0, 0, 0] == 2 and classes.dtype == np.uint8
    store.verify(["a/0.png", "a/1.png", "b/0.png"], tmp_path)
    with pytest.raises(ScoreMapError, match=r"image #1 is 'a/1.png' in the store but 'a/9.png'"):
        store.verify(["a/0.png", "a/9.png", "b/0.png"], tmp_path)
    with pytest.raises(ScoreMapError, match=r"first extra one in the dataset: 'c/0.png'"):
        store.verify(["a/0.png", "a/1.png", "b/0.png", "c/0.png"], tmp_path)
    with pytest.raises(ScoreMapError, match="5 classes"):
        store.verify(["a/0.png", "a/1.png", "b/0.png"], tmp_path, num_classes=7)


def test_missing_store_names_the_fix(tmp_path):
    with pytest.raises(ScoreMapError, match="dvc repro scoremaps"):
        ScoreMapStore(tmp_path / "nothing")


def test_writer_resumes_without_recomputing(tmp_path):
    paths = [f"x/{i}.png" for i in range(5)]
    w = ScoreMapWriter(tmp_path / "s", num_images=5, k=1, grid=(1, 1), num_classes=3, meta={"a": 1}, chunk=2)
    w.write_chunk(0, np.ones((2, 1, 1, 1), np.float16), np.zeros((2, 1, 1, 1), np.uint8))
    del w  # "killed" after one chunk
    assert not (tmp_path / "s").exists(), "an unfinished store must not appear under its final name"
    w2 = ScoreMapWriter(tmp_path / "s", num_images=5, k=1, grid=(1, 1), num_classes=3, meta={"a": 1}, chunk=2)
    assert w2.pending_chunks() == [1, 2]
    for c in w2.pending_chunks():
        r = w2.chunk_range(c)
        w2.write_chunk(c, np.full((len(r), 1, 1, 1), 7, np.float16), np.zeros((len(r), 1, 1, 1), np.uint8))
    store = w2.finish(paths, [(1, 1)] * 5)
    assert store.read(0)[0].item() == 1 and store.read(4)[0].item() == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial dir or lock file left beside it
    # other settings: the partial store is discarded, not mixed in
    w3 = ScoreMapWriter(tmp_path / "t", num_images=5, k=1, grid=(1, 1), num_classes=3, meta={"a": 1}, chunk=2)
    w3.write_chunk(0, np.ones((2, 1, 1, 1), np.float16), np.zeros((2, 1, 1, 1), np.uint8))
    del w3  # killed: nobody writes that partial store any more
    w4 = ScoreMapWriter(tmp_path / "t", num_images=5, k=1, grid=(1, 1), num_classes=3, meta={"a": 2}, chunk=2)
    assert w4.pending_chunks() == [0, 1, 2]


def test_topk_to_dense_zero_prob_vs_original_leak():
    logits = torch.tensor([[2.0, 1.0]]).reshape(1, 2, 1, 1)
    classes = torch.tensor([[3, 0]]).reshape(1, 2, 1, 1)
    p = topk_to_dense(logits, classes, 5, "zero_prob")[0, :, 0, 0]
    e = torch.exp(torch.tensor([2.0, 1.0]))
    assert torch.allclose(p, torch.tensor([e[1], 0, 0, e[0], 0]) / e.sum())
    leak = topk_to_dense(logits, classes, 5, "zero_logit")[0, :, 0, 0]
    assert leak[1] > 0 and torch.isclose(leak.sum(), torch.tensor(1.0))  # absent classes get e^0 each
    assert torch.isclose(leak[1], 1 / (e.sum() + 3))


def test_generate_with_a_checkpoint_through_timms_pretrained_path(tmp_path):
    """Train-free: save an annotator, load it as `pretrained` from the file, generate, resume-proof."""
    root = make_imagefolder(tmp_path / "data")
    torch.manual_seed(0)
    model = build_annotator("annotator_cnn", num_classes=2)
    ckpt = tmp_path / "annotator.pth"
    torch.save(model.state_dict(), ckpt)
    loaded = build_annotator("annotator_cnn", num_classes=2, checkpoint=str(ckpt))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    store = generate_score_maps(loaded, ds, tmp_path / "maps", k=2, batch_size=4, meta={"annotator": "annotator_cnn"}, chunk=4)
    assert store.grid == (8, 8) and len(store) == 6 and store.index["paths"] == ds.paths
    assert store.index["sizes"][0] == [24, 16]
    dense = dense_logits(loaded.eval(), ds[5]["image"][None])
    top = dense.topk(2, 1)
    logits, classes = store.read(5)
    assert np.array_equal(classes, top.indices[0].numpy())
    assert np.allclose(logits, top.values[0].numpy(), atol=1e-2)
    # the dataset checks the store it is given
    DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3, score_maps=tmp_path / "maps")
    # the same name, another image: 24x16 swapped for 16x24 is caught when the sample is read
    rotated = np.random.default_rng(7).integers(0, 255, (24, 16, 3), dtype=np.uint8)
    Image.fromarray(rotated).save(root / "train" / "a" / "1.png")
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3, score_maps=tmp_path / "maps")
    ds[0]
    with pytest.raises(ScoreMapError, match=r"a/1.png: image is 16x24 but the score-map store .* from a 24x16 image"):
        ds[1]
    (root / "train" / "b" / "9.png").write_bytes((root / "train" / "b" / "0.png").read_bytes())
    with pytest.raises(ScoreMapError, match="b/9.png"):
        DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3, score_maps=tmp_path / "maps")


def test_corrupt_image_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(Exception, match=r"a/1.png: cannot read image"):
        ds[1]


def test_an_error_in_a_loader_worker_reaches_the_user_as_one_line(tmp_path):
    """torch re-raises a worker's exception with the worker's traceback in its message; the stage prints its line."""
    from torch.utils.data import DataLoader

    from pipeline import one_line
    from tlvit.data.datasets import DatasetError

    root = make_imagefolder(tmp_path / "data")
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(DatasetError) as info:
        list(DataLoader(ds, batch_size=2, num_workers=1))
    assert "Original Traceback" in str(info.value)  # what a user saw: the worker's 40-line traceback
    line = one_line(info.value)
    assert "\n" not in line and line.startswith(str(root / "train" / "a" / "1.png")) and "cannot read image" in line
    assert one_line(DatasetError("x: fix it")) == "x: fix it"


def test_store_mismatch_hint_is_a_command_that_regenerates_the_store(tmp_path, monkeypatch):
    from tlvit.scoremaps_cli import add_parser

    root = make_imagefolder(tmp_path / "data")
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    model = build_annotator("annotator_cnn", 2)
    store = generate_score_maps(model, ds, tmp_path / "maps", k=2, batch_size=4, meta={"annotator": "annotator_cnn",
                                "checkpoint_sha256": "timm-pretrained", "input_size": 32}, chunk=4)
    (root / "train" / "b" / "9.png").write_bytes((root / "train" / "b" / "0.png").read_bytes())
    with pytest.raises(ScoreMapError) as info:
        DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3, score_maps=store.root)
    command = str(info.value).split("or `")[1].rstrip("`)")
    assert command.startswith(f"tlvit scoremaps --data {root} --split train --annotator annotator_cnn")
    import argparse
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(command.split()[1:])
    assert (args.data / args.split).is_dir() and args.out == store.root and args.input_size == 32


def test_composition_targets_train_each_location_on_its_own_cell(tmp_path):
    """With cell labels the dense loss reads each location's own label (IGNORE: no loss), not the image's."""
    from tlvit.labels.annotator import IGNORE, train_annotator

    root = make_imagefolder(tmp_path / "data", n_per_class=4, size=(32, 32))
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = build_annotator("annotator_cnn", num_classes=2)
    cells = torch.full((len(ds), 8, 8), IGNORE)
    cells[:, :, :4] = 1  # left half says class 1 whatever the image label; right half carries no label
    train_annotator(model, ds, epochs=8, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0, cells=cells, log=lambda *_: None)
    pred = dense_logits(model.eval(), torch.stack([ds[i]["image"] for i in range(len(ds))])).argmax(1)
    assert (pred[:, :, :4] == 1).float().mean() > 0.95  # learnt from the cells, although half the images are class 0
    with pytest.raises(ValueError, match=r"does not match the label cells \(4, 4\)"):
        train_annotator(model, ds, epochs=1, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0,
                        cells=torch.zeros(len(ds), 4, 4, dtype=torch.long), log=lambda *_: None)


def test_read_is_a_private_copy_and_pickling_sends_no_map_bytes(tmp_path):
    import pickle

    paths = [f"x/{i}.png" for i in range(400)]
    store = write_store(tmp_path / "s", paths, k=3, grid=(8, 8), chunk=64)
    logits, classes = store.read(7)
    assert type(logits) is np.ndarray and logits.flags.writeable and logits.base is None, "a copy the sample owns"
    logits[:] = -1  # must not reach the store (opened read-only)
    assert store.read(7)[0][0, 0, 0] == 7
    blob = pickle.dumps(store)  # what a spawn/forkserver loader worker receives
    assert len(blob) < store.logits.nbytes // 4, f"{len(blob)} bytes: the maps' data went into the pickle"
    again = pickle.loads(blob)
    for i in (0, 7, 399):
        assert all(np.array_equal(a, b) for a, b in zip(again.read(i), store.read(i)))


class ColourAnnotator(torch.nn.Module):
    """A stand-in annotator that calls red class 0 and green class 1 at every location (stride 4)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[10.0, -10.0, 0.0], [-10.0, 10.0, 0.0]])[:, :, None, None])
            self.head.bias.zero_()

    def forward_features(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)

    def get_classifier(self):
        return self.head


def test_score_maps_cover_the_whole_non_square_image(tmp_path):
    """A 96x32 image, red in its left quarter: the map's left quarter says class 0. A centre crop (the
    original's geometry, and tlvit's before) kept only x in [32, 64) and had no class 0 at all."""
    split = tmp_path / "data" / "train" / "a"
    split.mkdir(parents=True)
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :24, 0] = 255  # red: x < 24, a quarter of the width
    arr[:, 24:, 1] = 255  # green elsewhere
    Image.fromarray(arr).save(split / "wide.png")
    ds = DenseLabelDataset(tmp_path / "data", "train", WholeImageGeometry(32), (0.0,) * 3, (1.0,) * 3)
    store = generate_score_maps(ColourAnnotator(), ds, tmp_path / "maps", k=1, batch_size=1, meta={"annotator": "t"})
    top1 = np.asarray(store.classes[0, 0])  # [8, 8]
    assert (top1[:, :2] == 0).all() and (top1[:, 2:] == 1).all()
    from tlvit.data.datasets import EvalGeometry

    with pytest.raises(ValueError, match="WholeImageGeometry"):
        generate_score_maps(ColourAnnotator(), DenseLabelDataset(tmp_path / "data", "train", EvalGeometry(32),
                                                                 (0.0,) * 3, (1.0,) * 3),
                            tmp_path / "maps2", k=1, batch_size=1, meta={"annotator": "t"})


def test_val_split_with_other_class_folders_is_refused(tmp_path):
    """A val split missing one class would shift every later class id; it is one clear error instead."""
    from tlvit.data.datasets import DatasetError, val_split

    root = make_imagefolder(tmp_path, classes=("a", "b", "c"))
    for c in ("a", "c"):
        (root / "val" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "val" / c / "0.png")
    cfg, train_classes = {"img_size": 16, "crop_pct": 1.0}, ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"val: class folders differ from the train split's \(missing \['b'\]"):
        val_split(cfg, root, "imagefolder", classes=train_classes)
    (root / "val" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "b" / "0.png")
    assert val_split(cfg, root, "imagefolder", classes=train_classes).classes == train_classes


def test_a_directory_that_is_not_a_store_is_never_replaced(tmp_path):
    """`tlvit scoremaps --out DIR` on a user's directory: one clear error, the directory untouched."""
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ScoreMapError, match="my_results: exists and is not a score-map store"):
        write_store(mine, ["a.png", "b.png"])
    assert (mine / "notes.txt").read_text() == "keep me"
    # an older store of ours, and an empty directory, are replaced
    old = write_store(tmp_path / "store", ["a.png", "b.png"])
    assert old.index["paths"] == ["a.png", "b.png"]
    assert write_store(tmp_path / "store", ["c.png", "d.png"]).index["paths"] == ["c.png", "d.png"]
    (tmp_path / "empty").mkdir()
    assert len(write_store(tmp_path / "empty", ["a.png"])) == 1


def test_resuming_after_the_image_list_changed_recomputes(tmp_path):
    """Killed after some chunks, one image replaced by another of a new name (same count): the resumed store
    must not publish the old image's maps under the new name."""
    root = make_imagefolder(tmp_path / "data", n_per_class=4)
    model = build_annotator("annotator_cnn", num_classes=2)
    kw = dict(k=2, batch_size=4, meta={"annotator": "t"}, chunk=4)
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    # a killed run: shard 0 of 2 wrote chunk 0 (images a/0..a/3) and left the store unpublished
    assert generate_score_maps(model, ds, tmp_path / "s", shard=0, num_shards=2, **kw) is None
    (root / "train" / "a" / "0.png").unlink()
    arr = np.full((16, 24, 3), 255, np.uint8)  # white, unlike any of the random images
    Image.fromarray(arr).save(root / "train" / "a" / "00.png")
    ds = DenseLabelDataset(root, "train", WholeImageGeometry(32), (0.5,) * 3, (0.25,) * 3)
    store = generate_score_maps(model, ds, tmp_path / "s", **kw)
    fresh = generate_score_maps(model, ds, tmp_path / "fresh", **kw)
    assert store.index["paths"][0] == "a/00.png"
    assert np.array_equal(store.classes, fresh.classes) and np.array_equal(store.logits, fresh.logits)


def test_a_store_that_cannot_fit_fails_before_any_work(tmp_path, monkeypatch):
    import shutil as shutil_mod
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ScoreMapError, match=r"no space left on the device for the score maps: 0.01 GB needed, 0.00 GB free"):
        ScoreMapWriter(tmp_path / "s", num_images=1000, k=5, grid=(18, 18), num_classes=1000, meta={}, chunk=100)
    assert not (tmp_path / "s.partial").exists()
    monkeypatch.undo()
    w = ScoreMapWriter(tmp_path / "s", num_images=10, k=5, grid=(18, 18), num_classes=1000, meta={}, chunk=5)
    assert os.stat(tmp_path / "s.partial" / "logits.npy").st_blocks * 512 >= 10 * 5 * 18 * 18 * 2  # blocks reserved
    del w


def test_a_writer_with_other_settings_does_not_discard_a_live_writers_chunks(tmp_path):
    first = ScoreMapWriter(tmp_path / "s", num_images=4, k=2, grid=(2, 3), num_classes=5, meta={"annotator": "a"}, chunk=2)
    first.write_chunk(0, np.zeros((2, 2, 2, 3), np.float16), np.zeros((2, 2, 2, 3), np.uint8))
    with pytest.raises(ScoreMapError, match="another process is writing this store with other settings"):
        ScoreMapWriter(tmp_path / "s", num_images=4, k=2, grid=(2, 3), num_classes=5, meta={"annotator": "b"}, chunk=2)
    assert first.is_done(0)  # its chunk survived
    first._active.close()  # the first writer dies: its partial store is now anyone's to replace
    second = ScoreMapWriter(tmp_path / "s", num_images=4, k=2, grid=(2, 3), num_classes=5, meta={"annotator": "b"}, chunk=2)
    assert second.pending_chunks() == [0, 1]


def test_rerunning_after_publication_computes_nothing(tmp_path):
    meta = {"annotator": "t", "images_sha256": "0f"}  # what generate_score_maps records of its images
    w = ScoreMapWriter(tmp_path / "s", num_images=3, k=2, grid=(2, 3), num_classes=5, meta=meta, chunk=2)
    for c in w.pending_chunks():
        n = len(w.chunk_range(c))
        w.write_chunk(c, np.zeros((n, 2, 2, 3), np.float16), np.zeros((n, 2, 2, 3), np.uint8))
    store = w.finish(["a.png", "b.png", "c.png"], [(1, 1)] * 3)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    w = ScoreMapWriter(tmp_path / "s", num_images=3, k=2, grid=(2, 3), num_classes=5, meta=meta, chunk=2)
    assert w.pending_chunks() == [] and not (tmp_path / "s.partial").exists()
    again = w.finish(["a.png", "b.png", "c.png"], [(1, 1)] * 3)
    assert again.index == store.index and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == before
