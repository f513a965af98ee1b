"""Object detection and instance segmentation fine-tunes (TL-Align Table 4's analogue): each seed's checkpoint of a
trained row as the backbone of a Mask R-CNN (tlvit.models.detector), trained on the canvases' digits as objects
(tlvit.data.detection_sets) and scored by COCO's box and mask AP (torchmetrics' MeanAveragePrecision, pycocotools'
evaluation).

The recipe follows the Swin authors' COCO 3x configs, which Table 4's numbers come from: AdamW (lr 1e-4, weight decay
0.05, none on norms, biases and relative-position tables), a linear warm-up, then the learning rate divided by 10 at
each of `lr_steps` iterations, a batch of 16. The COCO run itself (Cascade Mask R-CNN, multi-scale 480-800 training)
is a cluster recipe with their code (docs/recipes.md): this stage fine-tunes on the canvases only, and reports a COCO
preset as not run. A fine-tune is resumable (a checkpoint every `checkpoint_every` iterations; each batch a function
of the seed and the iteration), has its own MLflow run, and lives in runs/<preset>/detection/<row>/seed<k>. Same
parent seed, same fine-tuning seed: a row and its baseline are paired.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tlvit.config import ConfigError
from tlvit.iteration_runs import IterationRun, batch_indices

log = logging.getLogger(__name__)

# COCO's AP at IoU 0.5:0.95, 0.5 and 0.75 for boxes and masks (percent), the columns of TL-Align Table 4
METRICS = ("ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask", "ap75_mask")
RECIPE_KEYS = ("dataset", "iterations", "batch_size", "lr", "weight_decay", "warmup_iters", "warmup_ratio", "lr_steps",
               "image_size", "channels", "fc_channels", "anchor_sizes", "rois_per_image", "proposals", "drop_path")


def detection_config(parent_cfg: dict, parent_hash: str, row: str, section: dict) -> dict:
    """A fine-tune's identity: its parent (row, config hash, model) and the recipe keys of the section."""
    missing = [k for k in RECIPE_KEYS if k not in section]
    if missing:
        raise ConfigError(f"params.yaml detection: missing {', '.join(missing)} (see defaults.detection)")
    return {"row": f"{row}+mask_rcnn", "init_from": row, "init_from_hash": parent_hash, "model": parent_cfg["model"],
            **{k: section[k] for k in RECIPE_KEYS},
            # stochastic depth per backbone (timm name) where the recipe names one (Swin's COCO configs: T/S 0.2, B 0.3)
            "drop_path": (section.get("model_drop_path") or {}).get(parent_cfg["model"], section["drop_path"])}


def build_detector_for(cfg: dict, parent_checkpoint: Path, num_classes: int):
    """The parent's reported weights (its EMA if any) at the image size, classifier dropped, under Mask R-CNN."""
    from tlvit.data.datasets import DATA_STATS
    from tlvit.evaluate import load_for_eval
    from tlvit.models.detector import build_detector

    setup = load_for_eval(parent_checkpoint, num_classes=num_classes, data_kind="canvases",
                          img_size=cfg["image_size"], drop_path=cfg["drop_path"])
    backbone = setup.model
    backbone.reset_classifier(0)
    mean, std = DATA_STATS["canvases"]  # the backbone's input normalisation, applied by the detector's transform
    model = build_detector(backbone, num_classes, cfg["image_size"], channels=cfg["channels"],
                           fc_channels=cfg["fc_channels"], anchor_sizes=tuple(cfg["anchor_sizes"]),
                           rois_per_image=cfg["rois_per_image"], proposals=cfg["proposals"], image_mean=mean,
                           image_std=std)
    return model, setup


def lr_factor(it: int, cfg: dict) -> float:
    """mmdetection's step schedule: divided by 10 at each of `lr_steps`, times a linear warm-up from `warmup_ratio`."""
    factor = 0.1 ** sum(it >= s for s in cfg["lr_steps"])
    if it < cfg["warmup_iters"]:
        k = it / cfg["warmup_iters"]
        factor *= cfg["warmup_ratio"] + (1 - cfg["warmup_ratio"]) * k
    return factor


def train_detector(cfg: dict, seed: int, run_dir: Path, train_set, val_set, parent_checkpoint: Path, *,
                   tracking: bool = True, experiment: str = "tlvit-detection", tags: dict | None = None,
                   device: str | None = None, checkpoint_every: int = 0, stop_after: int | None = None) -> dict:
    """Train (or resume) one fine-tune and score it; returns {"metrics": {...}, "config_hash", "mlflow_run_id"}.
    A finished run (result.json of this config) is read back, not trained again. stop_after: leave after that many
    iterations with a checkpoint (tests use it to interrupt a run)."""
    run = IterationRun(cfg, seed, run_dir, device)
    done = run.finished()
    if done is not None:
        return done
    env, dev = run.env, run.device
    torch.manual_seed(seed)
    model, setup = build_detector_for(cfg, parent_checkpoint, train_set.num_classes)
    optimizer, start, resume_rng = run.begin(model, tracking=tracking, experiment=experiment, tags=tags)
    if resume_rng is not None:  # the anchors' and RoIs' sampling continues from where the interrupted run left it
        torch.set_rng_state(resume_rng)
    net = run.parallel(model)
    stop = cfg["iterations"] if stop_after is None else min(cfg["iterations"], start + stop_after)
    every = checkpoint_every or cfg["iterations"]
    net.train()
    it = start
    while it < stop:
        idx = batch_indices(seed, it, cfg["batch_size"], len(train_set))[env.rank::env.world_size]
        samples = [train_set[int(i)] for i in idx]
        images = [x.to(dev) for x, _ in samples]
        targets = [{k: v.to(dev) for k, v in t.items()} for _, t in samples]
        losses = net(images, targets)
        it = run.step(model, optimizer, sum(losses.values()), it, lr=cfg["lr"] * lr_factor(it, cfg), stop=stop,
                      every=every, parts=losses)
    if it < cfg["iterations"]:
        return run.interrupted(it)
    metrics = evaluate(model, val_set, dev)
    result = run.finish(it, metrics, setup.source)
    log.info("%s seed %d: box AP %.2f, mask AP %.2f", cfg["row"], seed, metrics["ap_box"], metrics["ap_mask"])
    return result


@torch.no_grad()
def evaluate(model, dataset, device, batch_size: int = 16) -> dict:
    """COCO's box and mask AP (percent, METRICS) over the set, as pycocotools computes them (through torchmetrics;
    masks binarised at 0.5 as torchvision's Mask R-CNN pastes them). Under torch.distributed each process scores every
    world-th image and torchmetrics gathers the detections."""
    from torchmetrics.detection import MeanAveragePrecision

    from tlvit.distributed import init_distributed

    env = init_distributed()
    meter = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")
    model.eval()
    mine = list(range(env.rank, len(dataset), env.world_size))
    for b in range(0, len(mine), batch_size):
        samples = [dataset[i] for i in mine[b:b + batch_size]]
        outputs = model([x.to(device) for x, _ in samples])
        preds = [{"boxes": o["boxes"].cpu(), "scores": o["scores"].cpu(), "labels": o["labels"].cpu(),
                  "masks": (o["masks"][:, 0] > 0.5).cpu()} for o in outputs]
        targets = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool()} for _, t in samples]
        meter.update(preds, targets)
    r = meter.compute()
    return {f"ap{k}_{kind}": 100.0 * float(r[f"{iou}_map{k and '_' + k}"])
            for iou, kind in (("bbox", "box"), ("segm", "mask")) for k in ("", "50", "75")}


def planned_rows(trained: list[str], table: dict, section: dict, params_path: str = "params.yaml") -> list[str]:
    """Rows to fine-tune: `rows: table` the table's rows the preset trains; `all` every trained row; `none` nothing."""
    which = section.get("rows", "table")
    if which == "none":
        return []
    if which == "all":
        return list(trained)
    if which != "table":
        raise ConfigError(f"{params_path}: detection.rows must be `table`, `all` or `none`, not {which!r}")
    return [r["row"] for r in table["rows"] if r["row"] in trained]


def fine_tune_rows(layout, trained: list[str], table: dict, section: dict, seeds_of, data_section: dict, *,
                   params_path: str = "params.yaml", tracking: bool = True) -> dict:
    """Every planned row fine-tuned from each of its finished seeds; returns the stage's record: {"dataset",
    "present", "rows": [{"row", "seeds": [{seed, <metric>: value, ..., config_hash, mlflow_run_id}]}]}.
    data_section: the preset's `data` params (the canvases' spec, from which the instances are recovered)."""
    from tlvit.data.canvases import CanvasSpec
    from tlvit.data.detection_sets import DetectionSet

    runs_root = layout.root / "runs" / layout.preset / "detection"
    runs_root.mkdir(parents=True, exist_ok=True)  # the stage's output exists even when it has nothing to fine-tune
    plan = planned_rows(trained, table, section, params_path)
    kind = section.get("dataset", "canvases")
    if kind != "canvases":  # COCO: the Swin authors' detection code on a cluster (docs/recipes.md), never a number here
        return {"dataset": kind, "present": False, "rows": [{"row": r, "seeds": []} for r in plan]}
    sets = None
    out = []
    for row in plan:
        seeds = []
        for seed in seeds_of(row):
            if sets is None:  # composed once, and only when something is fine-tuned
                spec = CanvasSpec.from_params(data_section)
                sets = {s: DetectionSet(layout.dataset()["root"], s, spec) for s in ("train", "val")}
            parent = layout.run_dir(row, seed) / "checkpoint.pt"
            ckpt = torch.load(parent, map_location="cpu", weights_only=True)
            cfg = detection_config(ckpt["config"], ckpt["config_hash"], row, section)
            res = train_detector(cfg, seed, runs_root / row / f"seed{seed}", sets["train"], sets["val"], parent,
                                 tracking=tracking, experiment=f"tlvit-{layout.preset}-detection",
                                 tags={"detection_head": "mask_rcnn", "parent_row": row},
                                 checkpoint_every=int(section.get("checkpoint_every", 0)))
            seeds.append({"seed": seed, **res["metrics"], "config_hash": res["config_hash"],
                          "mlflow_run_id": res.get("mlflow_run_id")})
        out.append({"row": row, "seeds": seeds})
    return {"dataset": kind, "present": True, "rows": out}
