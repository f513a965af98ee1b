"""Detection and instance segmentation (TL-Align Table 4's analogue): the canvases' digits as instances, the Mask
R-CNN on a tlvit backbone, COCO's AP, resumable fine-tunes, the stage and its table."""
import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tlvit.config import ConfigError, load_params, preset_section, resolve_run_config
from tlvit.data.canvases import (CanvasSpec, canvas_instances, compose_canvas, load_gt_maps, load_source_digits,
                                 write_canvases)
from tlvit.data.detection_sets import DetectionSet, _mask_boxes
from tlvit.detection import detection_config, evaluate, fine_tune_rows, lr_factor, planned_rows, train_detector
from tlvit.models.detector import build_detector
from tlvit.report.detection import render
from tlvit.tables import load_column_table
from tlvit.train import reported_weights
from tlvit.transfer import finished_seeds

from parent_runs import tiny_parent_run

REPO = Path(__file__).resolve().parents[1]
TABLE = load_column_table(REPO / "experiments" / "detection.yaml")
SPEC = CanvasSpec(train=64, val=40, single=4, seed=1)  # every class in train and val


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvases")
    write_canvases(root, SPEC)
    return root


# ---------------------------------------------------------------------------- instances
def test_drawing_the_instance_map_leaves_the_canvas_unchanged():
    pool = load_source_digits(SPEC.train_digits_per_class)["train"]
    plain = compose_canvas(np.random.default_rng(5), pool, SPEC)
    owner = np.zeros((64, 64), np.uint8)
    traced = compose_canvas(np.random.default_rng(5), pool, SPEC, owner=owner)
    assert np.array_equal(plain[0], traced[0]) and np.array_equal(plain[1], traced[1]) and plain[2] == traced[2]
    assert owner.max() >= 2  # a primary and at least one secondary


def test_instances_partition_the_digits_pixels_and_the_primary_is_the_label(canvases):
    paths, owners, classes = canvas_instances(canvases, SPEC, "val")
    stored_paths, maps, labels = load_gt_maps(canvases, "val")
    assert paths == stored_paths and owners.shape == maps.shape
    for owner, gt, cls, label in zip(owners, maps, classes, labels):
        assert np.array_equal(owner > 0, gt != 255)  # every digit pixel belongs to exactly one instance
        for k, c in enumerate(cls, start=1):
            if c >= 0:
                assert (gt[owner == k] == c).all()
        last = int(owner.max())
        assert cls[last - 1] == label  # drawn last: the image label's digit


def test_canvases_of_another_spec_are_refused_with_the_file_named(canvases):
    with pytest.raises(ValueError, match="gt_maps_val.npz: these canvases were not composed"):
        canvas_instances(canvases, CanvasSpec(train=64, val=40, single=4, seed=3), "val")
    with pytest.raises(ValueError, match="has no instances"):
        canvas_instances(canvases, SPEC, "val_r")


def test_a_box_encloses_its_mask_to_the_pixel_border():
    mask = torch.zeros(1, 10, 12, dtype=torch.bool)
    mask[0, 3:5, 2:6] = True  # rows 3-4, columns 2-5
    assert _mask_boxes(mask).tolist() == [[2.0, 3.0, 6.0, 5.0]]
    assert _mask_boxes(torch.zeros(0, 10, 12, dtype=torch.bool)).shape == (0, 4)


def test_a_detection_sample_is_its_digits_as_objects(canvases):
    ds = DetectionSet(canvases, "val", SPEC)
    _, maps, labels = load_gt_maps(canvases, "val")
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        masks = target["masks"].bool()
        assert len(masks) == len(target["labels"]) == len(target["boxes"]) >= 2
        assert torch.equal(masks.any(0), torch.from_numpy(maps[i] != 255))
        assert int(target["labels"][-1]) == labels[i] + 1  # digit d is class d + 1 (0: torchvision's background)
        for m, box, lab in zip(masks, target["boxes"], target["labels"]):
            assert (torch.from_numpy(maps[i])[m] == lab - 1).all()
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# ---------------------------------------------------------------------------- the detector
@pytest.mark.parametrize("model", ["swin_e", "lvvit_e"])
def test_the_detector_trains_its_backbone_and_detects_at_the_image_size(canvases, model):
    torch.manual_seed(0)
    backbone = timm.create_model(model, num_classes=0)
    det = build_detector(backbone, 10, 64, channels=16, fc_channels=32, anchor_sizes=(8, 16, 32, 64, 128),
                         rois_per_image=16, proposals=50)
    assert det.rpn._post_nms_top_n == {"training": 2000, "testing": 50}  # the RPN keeps `proposals` at inference
    assert det.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    ds = DetectionSet(canvases, "train", SPEC)
    images, targets = zip(*[ds[i] for i in range(2)])
    losses = det(list(images), list(targets))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    grads = [p.grad for n, p in det.named_parameters() if n.startswith("backbone.features.backbone.")]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    names = dict(det.named_parameters())
    assert det.no_weight_decay() and det.no_weight_decay() <= set(names)  # timm's optimizer finds each by name
    det.eval()
    with torch.no_grad():
        (out,) = det([images[0]])
    assert out["masks"].shape[1:] == (1, 64, 64) and out["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="one size per FPN level"):
        build_detector(timm.create_model(model, num_classes=0), 10, 64, anchor_sizes=(8, 16))


def test_the_schedule_is_mmdetections_steps_after_a_linear_warm_up():
    cfg = {"lr_steps": [60, 90], "warmup_iters": 10, "warmup_ratio": 0.001}
    assert lr_factor(0, cfg) == pytest.approx(0.001) and lr_factor(5, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(59, cfg) == 1.0
    assert lr_factor(60, cfg) == pytest.approx(0.1) and lr_factor(95, cfg) == pytest.approx(0.01)


class _Oracle(torch.nn.Module):
    """Answers with the set's own targets (optionally with every label shifted to another class)."""

    def __init__(self, ds, shift: int = 0):
        super().__init__()
        self.targets = {i: ds.target(i) for i in range(len(ds))}
        self.images = [ds[i][0] for i in range(len(ds))]
        self.shift = shift

    def forward(self, images):
        out = []
        for x in images:
            i = next(k for k, im in enumerate(self.images) if torch.equal(im, x))
            t = self.targets[i]
            labels = (t["labels"] - 1 + self.shift) % 10 + 1
            out.append({"boxes": t["boxes"], "labels": labels, "scores": torch.ones(len(labels)),
                        "masks": t["masks"][:, None].float()})
        return out


def test_ap_is_cocos_100_for_the_truth_and_0_for_wrong_classes(canvases):
    ds = DetectionSet(canvases, "val", SPEC)
    perfect = evaluate(_Oracle(ds), ds, torch.device("cpu"), batch_size=5)
    assert set(perfect) == {"ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask", "ap75_mask"}
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    wrong = evaluate(_Oracle(ds, shift=3), ds, torch.device("cpu"))
    assert all(v == pytest.approx(0.0) for v in wrong.values())


# ---------------------------------------------------------------------------- configs, fine-tunes, the stage
def test_a_fine_tunes_config_is_its_parent_and_the_recipe():
    params = load_params(REPO / "params.yaml")
    section = preset_section(params, "embedded")["detection"]
    configs = {}
    for row in ("swin_t_mixup_cutmix", "swin_t_tlalign"):
        parent = resolve_run_config(params, row, preset="embedded", rows_path=REPO / "experiments" / "rows.yaml",
                                    params_path=REPO / "params.yaml")
        configs[row] = detection_config(parent, "h-" + row, row, section)
    cfg = configs["swin_t_tlalign"]
    assert cfg["row"] == "swin_t_tlalign+mask_rcnn" and cfg["init_from_hash"] == "h-swin_t_tlalign"
    assert cfg["dataset"] == "canvases" and cfg["image_size"] == 64 and cfg["lr_steps"] == [450, 550]
    assert cfg["proposals"] == 100 and cfg["rois_per_image"] == 64
    strip = lambda c: {k: v for k, v in c.items() if k not in ("row", "init_from", "init_from_hash")}  # noqa: E731
    assert strip(configs["swin_t_mixup_cutmix"]) == strip(cfg)  # a pair differs only in its start
    full = preset_section(params, "imagenet")["detection"]
    parent = resolve_run_config(params, "swin_b_tlalign", preset="imagenet",
                                rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml")
    big = detection_config(parent, "h", "swin_b_tlalign", full)
    assert big["dataset"] == "coco" and big["lr"] == 1e-4 and big["weight_decay"] == 0.05
    assert big["drop_path"] == 0.3 and big["iterations"] == 266148  # the Swin authors' Swin-B 3x config
    assert big["proposals"] == 1000 and big["rois_per_image"] == 512 and big["channels"] == 256
    with pytest.raises(ConfigError, match="missing lr_steps"):
        detection_config(parent, "h", "swin_b_tlalign", {k: v for k, v in full.items() if k != "lr_steps"})


def test_planned_rows_follow_the_table_or_all_or_none():
    trained = ["swin_t_tlalign", "lvvit_s_baseline"]
    assert planned_rows(trained, TABLE, {"rows": "table"}) == ["swin_t_tlalign"]
    assert planned_rows(trained, TABLE, {"rows": "all"}) == trained
    assert planned_rows(trained, TABLE, {"rows": "none"}) == []
    with pytest.raises(ConfigError, match="detection.rows must be"):
        planned_rows(trained, TABLE, {"rows": "tables"})


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, canvases):
    """A finished 1-epoch run of a tiny DeiT analog, laid out as preset `t`'s row `deit_s_cutmix`."""
    layout, params = tiny_parent_run(tmp_path_factory.mktemp("repo"), canvases)
    section = copy.deepcopy(preset_section(params, "smoke")["detection"])
    section.update(iterations=4, warmup_iters=1, lr_steps=[3], batch_size=2, channels=16, fc_channels=32,
                   rois_per_image=16, checkpoint_every=2)
    return layout, section


def _fine_tune(layout, section, run_dir, **kw):
    sets = {s: DetectionSet(layout.dataset()["root"], s, SPEC) for s in ("train", "val")}
    parent = layout.run_dir("deit_s_cutmix", 0) / "checkpoint.pt"
    ckpt = torch.load(parent, map_location="cpu", weights_only=True)
    cfg = detection_config(ckpt["config"], ckpt["config_hash"], "deit_s_cutmix", section)
    return train_detector(cfg, 0, run_dir, sets["train"], sets["val"], parent, tracking=False, **kw)


def test_an_interrupted_fine_tune_resumes_to_the_uninterrupted_result(parent_run, tmp_path):
    layout, section = parent_run
    torch.set_num_threads(1)
    whole = _fine_tune(layout, section, tmp_path / "whole", checkpoint_every=2)
    part = _fine_tune(layout, section, tmp_path / "split", checkpoint_every=2, stop_after=2)
    assert part["metrics"] is None and part["iteration"] == 2
    done = _fine_tune(layout, section, tmp_path / "split", checkpoint_every=2)
    assert done["iteration"] == 4 and done["metrics"] == whole["metrics"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the backbone started from the parent's weights and moved, only by training
    parent = reported_weights(torch.load(layout.run_dir("deit_s_cutmix", 0) / "checkpoint.pt", weights_only=True))
    w = "blocks.0.attn.qkv.weight"
    moved = a[f"backbone.features.backbone.{w}"]
    assert not torch.equal(moved, parent[w]) and (moved - parent[w]).abs().max() < 0.05
    changed = dict(section, lr=section["lr"] * 2)  # a changed recipe in the same folder: a new run, the old set aside
    again = _fine_tune(layout, changed, tmp_path / "whole", checkpoint_every=2)
    assert again["config_hash"] != whole["config_hash"]
    assert list((tmp_path / "whole").glob(f"checkpoint.pt.{whole['config_hash']}.superseded"))


def test_the_stage_fine_tunes_every_finished_seed_collects_on_a_rerun_and_renders(parent_run):
    layout, section = parent_run
    torch.set_num_threads(1)
    data = {"train": 64, "val": 40, "single": 4, "seed": 1}
    run = lambda sec: fine_tune_rows(layout, ["deit_s_cutmix"], TABLE, sec,  # noqa: E731
                                     lambda r: finished_seeds(layout, r), data, tracking=False)
    record = run(dict(section, rows="all"))
    assert record["present"] and record["dataset"] == "canvases"
    (row,) = record["rows"]
    assert row["row"] == "deit_s_cutmix" and [s["seed"] for s in row["seeds"]] == [0]
    assert all(0 <= row["seeds"][0][k] <= 100 for k in ("ap_box", "ap50_box", "ap_mask", "ap75_mask"))
    result = layout.root / "runs" / "t" / "detection" / "deit_s_cutmix" / "seed0" / "result.json"
    mtime = result.stat().st_mtime
    assert run(dict(section, rows="all")) == record and result.stat().st_mtime == mtime  # collected, not trained
    assert run(dict(section, rows="table")) == {"dataset": "canvases", "present": True, "rows": []}
    coco = run(dict(section, rows="all", dataset="coco"))
    assert coco == {"dataset": "coco", "present": False, "rows": [{"row": "deit_s_cutmix", "seeds": []}]}
    md = render(TABLE, dict(coco, preset="imagenet", commit="abc", date="d"))
    assert "| Swin-T | 50.40 / not present |" in md


def test_the_table_pairs_each_tl_align_row_with_its_baseline():
    def entry(row, values):
        return {"row": row, "seeds": [{"seed": s, "ap_box": v, "ap_mask": v - 5} for s, v in enumerate(values)]}

    record = {"preset": "e", "commit": "abc", "date": "d", "dataset": "canvases", "present": True,
              "rows": [entry("swin_t_mixup_cutmix", [40.0, 42.0, 44.0]), entry("swin_t_tlalign", [41.0, 43.5, 45.0])]}
    md = render(TABLE, record)
    line = next(x for x in md.splitlines() if x.startswith("| Swin-T + TL-Align vs"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells[0] == "+0.10 / +1.17 [+0.45, +1.88]"  # paper 50.5 - 50.4; measured mean of (1.0, 1.5, 1.0)
    assert cells[3].startswith("+0.10 / +1.17")  # mask AP: 43.8 - 43.7, the same measured differences
    assert "| Swin-S | 51.90 / — |" in md  # not trained here
