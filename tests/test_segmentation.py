"""Semantic segmentation (LV-ViT slides Tables 5-6, TL-Align Table 3): the backbones' feature levels, the heads, the
sets and their sampling, sliding-window and multi-scale inference, mmsegmentation's metrics, resumable fine-tunes,
the stage and its tables."""
import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from tlvit.config import ConfigError, load_params, preset_section, resolve_run_config
from tlvit.data.canvases import CanvasSpec, load_gt_maps, write_canvases
from tlvit.data.datasets import DATA_STATS
from tlvit.data.segmentation_sets import Geometry, SegmentationSet, SegmentationSetError
from tlvit.layout import Layout
from tlvit.models.segmenter import BackboneFeatures, Segmenter, vit_block_indices
from tlvit.report.segmentation import render
from tlvit.segmentation import (evaluate, fine_tune_rows, planned_runs, scale_probs, scores, segmentation_config,
                                slide_logits, train_segmenter)
from tlvit.tables import load_segmentation_tables
from tlvit.train import reported_weights
from tlvit.transfer import finished_seeds

from parent_runs import tiny_parent_run

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- backbones and heads
def test_vit_block_indices_are_mmsegmentations_out_indices():
    assert vit_block_indices(12) == [2, 5, 8, 11] and vit_block_indices(16) == [3, 7, 11, 15]
    assert vit_block_indices(24) == [5, 11, 17, 23] and vit_block_indices(4) == [0, 1, 2, 3]


def test_vit_levels_are_the_chosen_blocks_patch_tokens_on_the_grid():
    torch.manual_seed(0)
    model = timm.create_model("lvvit_e", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = BackboneFeatures(model, levels=4, neck_channels=16)._vit_maps(x)
    # reference: the blocks run one by one, each chosen output's patch tokens laid out row by row on the grid
    with torch.no_grad():
        t = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1) + model.pos_embed
        outs = []
        for block in model.blocks:
            t = block(t)
            outs.append(t)
    gh, gw = model.token_grid
    for m, i in zip(maps, vit_block_indices(len(model.blocks))):
        ref = outs[i][:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(m.detach(), ref)
    # the neck resamples them to 4, 2, 1 and 1/2 x the grid; levels=1 is the last block's map alone
    shapes = [tuple(m.shape) for m in BackboneFeatures(model, levels=4, neck_channels=16)(x)]
    assert shapes == [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]
    (last,) = BackboneFeatures(model, levels=1)(x)
    torch.testing.assert_close(last.detach(), outs[-1][:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2))


def test_pyramid_levels_are_the_stages_and_a_missing_fourth_is_pooled_from_the_third():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    pvt = timm.create_model("pvt_e", num_classes=0).eval()  # four stages: strides 4..32
    maps = BackboneFeatures(pvt, levels=4)(x)
    stages = pvt.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    for m, s in zip(maps, stages):
        torch.testing.assert_close(m, s)
    swin = timm.create_model("swin_e", num_classes=0).eval()  # the embedded analog has three stages
    maps = BackboneFeatures(swin, levels=4)(x)
    stages = swin.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (96, 2, 2)]
    torch.testing.assert_close(maps[3], F.max_pool2d(stages[2], 2))
    (last,) = BackboneFeatures(swin, levels=1)(x)
    torch.testing.assert_close(last, stages[-1])


@pytest.mark.parametrize("model", ["lvvit_e", "deit_e", "swin_e", "pvt_e"])
@pytest.mark.parametrize("head", ["fcn", "upernet"])
def test_a_segmenter_gives_logits_at_the_input_size_and_trains_its_backbone(model, head):
    torch.manual_seed(0)
    seg = Segmenter(timm.create_model(model, num_classes=0), head, 11, channels=32, aux_weight=0.4)
    x = torch.randn(2, 3, 64, 64)
    logits, aux = seg(x, with_aux=True)
    assert logits.shape == (2, 11, 64, 64)
    assert (aux is None) == (head == "fcn") and (aux is None or aux.shape == logits.shape)
    loss = F.cross_entropy(logits, torch.randint(0, 11, (2, 64, 64))) + (0 if aux is None else aux.mean())
    loss.backward()
    first = next(p for n, p in seg.named_parameters() if n.startswith("features.backbone.patch_embed"))
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert seg(x).shape == (2, 11, 64, 64)
    with pytest.raises(ValueError, match="use one of"):
        Segmenter(timm.create_model(model, num_classes=0), "deeplab", 11)


# ---------------------------------------------------------------------------- sets
@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvases")
    write_canvases(root, CanvasSpec(train=64, val=40, single=4, seed=1))
    return root


def test_canvas_maps_are_the_digits_and_the_background_is_class_10(canvases):
    mean, std = DATA_STATS["canvases"]
    ds = SegmentationSet("canvases", canvases, "val", mean, std)
    _, maps, _ = load_gt_maps(canvases, "val")
    assert ds.num_classes == 11 and len(ds) == len(maps) == 40
    image, target = ds[5]
    assert image.shape == (3, 64, 64) and target.dtype == torch.int64
    raw = torch.from_numpy(maps[5].astype(np.int64))
    assert torch.equal(target[raw == 255], torch.full_like(target[raw == 255], 10))
    assert torch.equal(target[raw != 255], raw[raw != 255]) and (raw != 255).any()
    pixels = np.asarray(Image.open(ds.images[5]).convert("RGB"), dtype=np.float32) / 255.0
    torch.testing.assert_close(image[0], (torch.from_numpy(pixels[..., 0]) - mean[0]) / std[0])


def test_ade20k_drops_class_0_and_names_what_is_missing(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "images" / "validation" / "ADE_val_1.jpg")
    ann = np.zeros((30, 40), np.uint8)
    ann[:, 10:20], ann[:, 20:] = 1, 150
    Image.fromarray(ann).save(tmp_path / "annotations" / "validation" / "ADE_val_1.png")
    ds = SegmentationSet("ade20k", tmp_path, "val", *DATA_STATS["imagefolder"])
    image, target = ds[0]
    assert ds.num_classes == 150 and image.shape == (3, 30, 40)
    assert set(target[:, :10].unique().tolist()) == {255} and set(target[:, 10:20].unique().tolist()) == {0}
    assert set(target[:, 20:].unique().tolist()) == {149}
    with pytest.raises(SegmentationSetError, match="segmentation.source"):
        SegmentationSet("ade20k", tmp_path, "train", *DATA_STATS["imagefolder"])
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "validation" / "ADE_val_2.jpg")
    with pytest.raises(SegmentationSetError, match="ADE_val_2.png: missing annotation"):
        SegmentationSet("ade20k", tmp_path, "val", *DATA_STATS["imagefolder"])
    with pytest.raises(SegmentationSetError, match="use `canvases` or `ade20k`"):
        SegmentationSet("cityscapes", tmp_path, "val", *DATA_STATS["imagefolder"])


def test_a_training_sample_is_a_function_of_its_generator(canvases):
    ds = SegmentationSet("canvases", canvases, "train", *DATA_STATS["canvases"])
    geometry = Geometry(crop_size=48, scale=(64, 64), ratio_range=(0.5, 2.0), hflip=0.5, photometric=True)
    a = ds.sample(3, geometry, np.random.default_rng(7))
    b = ds.sample(3, geometry, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 48, 48) and a[1].shape == (48, 48)
    others = [ds.sample(3, geometry, np.random.default_rng(s))[1] for s in range(8)]
    assert any(not torch.equal(o, others[0]) for o in others)
    # rescaled below the crop: the crop is padded, the padding not scored
    small = Geometry(crop_size=64, scale=(64, 64), ratio_range=(0.5, 0.5), hflip=0.0)
    x, y = ds.sample(3, small, np.random.default_rng(0))
    assert (y == 255).sum() == 64 * 64 - 32 * 32 and (x[:, y == 255] == 0).all()
    # a certain flip mirrors image and map together
    keep = ds.sample(3, Geometry(crop_size=64, scale=(64, 64), ratio_range=(1, 1), hflip=0.0), np.random.default_rng(1))
    flip = ds.sample(3, Geometry(crop_size=64, scale=(64, 64), ratio_range=(1, 1), hflip=1.0), np.random.default_rng(1))
    assert torch.equal(flip[0], keep[0].flip(-1)) and torch.equal(flip[1], keep[1].flip(-1))


# ---------------------------------------------------------------------------- inference and metrics
class _PixelwiseLinear(torch.nn.Module):
    """A 1x1 convolution: its output at a pixel depends on that pixel alone, so any window layout gives the same."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("size", [(50, 70), (20, 25), (32, 32)])
def test_sliding_windows_cover_every_pixel_once_averaged(size):
    model = _PixelwiseLinear()
    image = torch.randn(3, *size)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model, image, crop=32, stride=21, num_classes=5),
                                   model(image[None])[0])


def test_a_flipped_view_is_mirrored_back_before_it_is_averaged():
    model = _PixelwiseLinear()
    image = torch.randn(3, 40, 40)
    cfg = {"stride": 21}
    with torch.no_grad():
        plain = scale_probs(model, image, cfg, 5, 32, 1.0, flip=False)
        torch.testing.assert_close(scale_probs(model, image, cfg, 5, 32, 1.0, flip=True), plain)
        torch.testing.assert_close(plain, model(image[None])[0].softmax(0))
        assert scale_probs(model, image, cfg, 5, 32, 0.5, flip=False).shape == (5, 40, 40)


def test_scores_follow_mmsegmentation_where_torchmetrics_macro_accuracy_differs():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    target = torch.tensor([[0, 0, 1, 1, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 3, 2, 0]])
    confusion = MulticlassConfusionMatrix(4, ignore_index=255)(pred, target)
    out = scores(confusion)
    # class 0: IoU 1/3, recall 1/2; class 1: IoU 1/4, recall 1/3; class 3: predicted once, never labelled: IoU 0 and
    # no recall; class 2: only under an ignored pixel: nothing to score
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 1 / 4 + 0) / 3)
    assert out["macc"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2) and out["pacc"] == pytest.approx(100 * 2 / 5)
    assert 100 * MulticlassAccuracy(4, average="macro", ignore_index=255)(pred, target) != pytest.approx(out["macc"])


class _Oracle(torch.nn.Module):
    """Predicts the class written in the image's first channel."""

    def forward(self, x):
        return 10.0 * F.one_hot(x[:, 0].round().long().clamp(0, 3), 4).permute(0, 3, 1, 2).float()


class _Fixed(torch.utils.data.Dataset):
    num_classes = 4

    def __init__(self, preds, targets):
        self.preds, self.targets = preds, targets

    def __len__(self):
        return len(self.preds)

    def __getitem__(self, i):
        return self.preds[i].float()[None].expand(3, -1, -1).clone(), self.targets[i]


def test_evaluate_scores_every_image_at_its_own_size():
    from torchmetrics.classification import MulticlassConfusionMatrix

    g = torch.Generator().manual_seed(0)
    shapes = [(20, 30), (24, 24), (30, 18)]
    preds = [torch.randint(0, 4, s, generator=g) for s in shapes]
    targets = [torch.where(torch.rand(s, generator=g) < 0.7, p, torch.randint(0, 4, s, generator=g))
               for p, s in zip(preds, shapes)]
    targets[1][:5] = 255
    cfg = {"scale": (30, 24), "scales": [1.0], "flip": False, "stride": 10, "crop_size": 16}
    out = evaluate(_Oracle(), _Fixed(preds, targets), cfg, torch.device("cpu"))
    confusion = sum(MulticlassConfusionMatrix(4, ignore_index=255)(p[None], t[None]) for p, t in zip(preds, targets))
    expected = scores(confusion)
    for k, v in expected.items():
        assert out[k] == pytest.approx(v) and out[f"{k}_ms"] == pytest.approx(v)
    assert 0 < out["miou"] < 100


# ---------------------------------------------------------------------------- planning and configs
TABLES = load_segmentation_tables()


def test_planned_runs_follow_the_tables_or_all_or_none():
    trained = ["lvvit_s_baseline", "lvvit_s_token_labeling", "deit_s_cutmix"]
    assert planned_runs(trained, TABLES, {"rows": "tables"}) == [
        ("lvvit_s_baseline", "fcn"), ("lvvit_s_token_labeling", "fcn"), ("lvvit_s_baseline", "upernet"),
        ("lvvit_s_token_labeling", "upernet"), ("deit_s_cutmix", "upernet")]
    assert planned_runs(["x"], TABLES, {"rows": "all", "heads": ["fcn", "upernet"]}) == [("x", "fcn"), ("x", "upernet")]
    assert planned_runs(trained, TABLES, {"rows": "tables", "heads": ["fcn"]}) == [
        ("lvvit_s_baseline", "fcn"), ("lvvit_s_token_labeling", "fcn")]
    assert planned_runs(trained, TABLES, {"rows": "none"}) == []
    with pytest.raises(ConfigError, match="p.yaml: segmentation.rows must be"):
        planned_runs(trained, TABLES, {"rows": "some"}, "p.yaml")
    with pytest.raises(ConfigError, match="unknown head 'psp'"):
        planned_runs(trained, TABLES, {"rows": "all", "heads": ["psp"]})


def test_every_table_row_names_a_known_row_and_head():
    from tlvit.config import load_rows

    known = set(load_rows(REPO / "experiments" / "rows.yaml"))
    for key, table in TABLES.items():
        for r in table["rows"]:
            assert r["row"] in known and r["head"] in ("fcn", "upernet"), (key, r)
            assert set(r["paper"]) <= set(table["columns"]), (key, r)


def test_a_fine_tunes_config_is_its_parent_and_the_recipe():
    params = load_params(REPO / "params.yaml")
    section = preset_section(params, "embedded")["segmentation"]
    configs = {}
    for row in ("swin_t_mixup_cutmix", "swin_t_tlalign"):
        parent = resolve_run_config(params, row, preset="embedded", rows_path=REPO / "experiments" / "rows.yaml",
                                    params_path=REPO / "params.yaml")
        configs[row] = segmentation_config(parent, "h-" + row, row, "upernet", section)
    cfg = configs["swin_t_tlalign"]
    assert cfg["row"] == "swin_t_tlalign+upernet" and cfg["init_from_hash"] == "h-swin_t_tlalign"
    assert cfg["data_kind"] == "canvases" and cfg["iterations"] == 600 and cfg["augment"]["crop_size"] == 64
    strip = lambda c: {k: v for k, v in c.items() if k not in ("row", "init_from", "init_from_hash")}  # noqa: E731
    assert strip(configs["swin_t_mixup_cutmix"]) == strip(cfg)  # a pair differs only in its start
    full = preset_section(params, "imagenet")["segmentation"]
    parent = resolve_run_config(params, "swin_t_tlalign", preset="imagenet", rows_path=REPO / "experiments" / "rows.yaml",
                                params_path=REPO / "params.yaml")
    big = segmentation_config(parent, "h", "swin_t_tlalign", "upernet", full)
    assert big["iterations"] == 160000 and big["augment"]["crop_size"] == 512 and big["lr"] == 6e-5
    assert big["drop_path"] == 0.3 and big["data_kind"] == "imagefolder"  # mmsegmentation's Swin configs
    with pytest.raises(ConfigError, match="missing lr"):
        segmentation_config(parent, "h", "swin_t_tlalign", "upernet", {k: v for k, v in full.items() if k != "lr"})


# ---------------------------------------------------------------------------- fine-tunes and the stage
@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, canvases):
    """A finished 1-epoch run of a tiny DeiT analog, laid out as preset `t`'s row `deit_s_cutmix`."""
    layout, params = tiny_parent_run(tmp_path_factory.mktemp("repo"), canvases)
    section = copy.deepcopy(preset_section(params, "smoke")["segmentation"])
    section.update(rows="tables", iterations=4, warmup_iters=1, batch_size=4, channels=16, checkpoint_every=2)
    section["eval"].update(scales=[0.75, 1.0])
    return layout, section


def _fine_tune(layout, section, run_dir, **kw):
    mean, std = DATA_STATS["canvases"]
    root = layout.dataset()["root"]
    sets = {s: SegmentationSet("canvases", root, s, mean, std) for s in ("train", "val")}
    parent = layout.run_dir("deit_s_cutmix", 0) / "checkpoint.pt"
    ckpt = torch.load(parent, map_location="cpu", weights_only=True)
    cfg = segmentation_config(ckpt["config"], ckpt["config_hash"], "deit_s_cutmix", "upernet", section)
    return train_segmenter(cfg, 0, run_dir, sets["train"], sets["val"], parent, tracking=False, **kw)


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
    # the parent's weights are where it started: the backbone moved, and only by training
    parent = reported_weights(torch.load(layout.run_dir("deit_s_cutmix", 0) / "checkpoint.pt", weights_only=True))
    w = "blocks.0.attn.qkv.weight"
    start = parent[w]
    moved = a[f"features.backbone.{w}"]
    assert not torch.equal(moved, start) and (moved - start).abs().max() < 0.05
    # a changed recipe in the same folder is a new run: the old checkpoint is set aside, not continued
    changed = dict(section, lr=section["lr"] * 2)
    again = _fine_tune(layout, changed, tmp_path / "whole", checkpoint_every=2)
    assert again["config_hash"] != whole["config_hash"]
    assert list((tmp_path / "whole").glob(f"checkpoint.pt.{whole['config_hash']}.superseded"))


def test_the_stage_fine_tunes_every_finished_seed_collects_on_a_rerun_and_pairs_the_rows(parent_run):
    layout, section = parent_run
    torch.set_num_threads(1)
    record = fine_tune_rows(layout, ["deit_s_cutmix"], TABLES, section, lambda r: finished_seeds(layout, r),
                            tracking=False)
    assert record["present"] and record["dataset"] == "canvases"
    (run,) = record["runs"]
    assert (run["row"], run["head"]) == ("deit_s_cutmix", "upernet") and [s["seed"] for s in run["seeds"]] == [0]
    assert all(0 <= run["seeds"][0][k] <= 100 for k in ("miou", "pacc", "macc", "miou_ms"))
    result = layout.root / "runs" / "t" / "segmentation" / "upernet" / "deit_s_cutmix" / "seed0" / "result.json"
    mtime = result.stat().st_mtime
    again = fine_tune_rows(layout, ["deit_s_cutmix"], TABLES, section, lambda r: finished_seeds(layout, r),
                           tracking=False)
    assert again == record and result.stat().st_mtime == mtime  # collected, not trained again
    ade = fine_tune_rows(layout, ["deit_s_cutmix"], TABLES, dict(section, dataset="ade20k", source=""),
                         lambda r: finished_seeds(layout, r), tracking=False)
    assert ade == {"dataset": "ade20k", "present": False, "runs": [{"row": "deit_s_cutmix", "head": "upernet",
                                                                    "seeds": []}]}
    md = render("tlalign_table3", TABLES["tlalign_table3"], dict(record, preset="t", commit="abc", date="d"))
    line = next(x for x in md.splitlines() if x.startswith("| DeiT-S |"))
    assert f"{run['seeds'][0]['miou']:.2f}" in line and "43.8" in line


def test_the_stage_output_exists_when_there_is_nothing_to_fine_tune(tmp_path):
    record = fine_tune_rows(Layout("p", tmp_path), [], TABLES, {"rows": "none"}, lambda r: [])
    assert record == {"dataset": "canvases", "present": True, "runs": []}
    assert (tmp_path / "runs" / "p" / "segmentation").is_dir()


def test_a_table_pairs_each_row_with_its_baseline_under_the_same_head():
    def entry(row, head, values):
        return {"row": row, "head": head, "seeds": [{"seed": s, "miou": v, "pacc": 90.0, "miou_ms": v + 1,
                                                     "pacc_ms": 91.0} for s, v in enumerate(values)]}

    record = {"preset": "e", "commit": "abc", "date": "d", "dataset": "canvases", "present": True,
              "runs": [entry("lvvit_s_baseline", "fcn", [40.0, 42.0, 44.0]),
                       entry("lvvit_s_token_labeling", "fcn", [41.0, 43.5, 45.0]),
                       entry("lvvit_s_baseline", "upernet", [50.0, 50.0, 50.0])]}
    md = render("lvvit_slides_table5", TABLES["lvvit_slides_table5"], record)
    fcn = next(x for x in md.splitlines() if "+ FCN + token labeling vs" in x)
    cells = [c.strip() for c in fcn.strip("|").split("|")][1:]
    assert cells[0] == "+1.10 / +1.17 [+0.45, +1.88]"  # paper 47.2 - 46.1; measured mean of (1.0, 1.5, 1.0)
    upernet = next(x for x in md.splitlines() if "+ UperNet + token labeling vs" in x)
    assert "+1.17" not in upernet  # the UperNet pair has no token-labeling seeds: no measured Δ
