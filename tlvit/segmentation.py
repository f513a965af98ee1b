"""Semantic segmentation fine-tunes (LV-ViT slides Tables 5-6; TL-Align Table 3): each seed's checkpoint of a trained
row, with an FCN or a UperNet head (tlvit.models.segmenter), trained on a segmentation set and scored by mIoU, pixel
accuracy and mean class accuracy as mmsegmentation computes them (from torchmetrics' confusion matrix), single-scale
and multi-scale.

The recipe is mmsegmentation's for ADE20K, which both papers' numbers come from: AdamW (lr 6e-5, weight decay 0.01,
none on norms, biases, position embeddings and relative-position tables), a linear warm-up then a poly schedule by
iteration, a batch of 16 crops of 512 px, cross-entropy with an auxiliary FCN head (weight 0.4), sliding-window
inference, and multi-scale testing over the ratios 0.5-1.75 with flips. Params `segmentation` set it (the embedded
presets shrink it to 64 px canvases). A fine-tune is resumable (a checkpoint every `checkpoint_every` iterations; each
batch is a function of the seed and the iteration, so a resumed run draws the batches an uninterrupted one would), has
its own MLflow run, and lives in runs/<preset>/segmentation/<head>/<row>/seed<k>. Same parent seed, same fine-tuning
seed: a row and its baseline are paired.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tlvit.config import ConfigError
from tlvit.iteration_runs import IterationRun, batch_indices

log = logging.getLogger(__name__)

METRICS = ("miou", "pacc", "macc")  # mean IoU, pixel accuracy, mean class accuracy (percent)
RECIPE_KEYS = ("dataset", "iterations", "batch_size", "lr", "weight_decay", "warmup_iters", "warmup_ratio",
               "poly_power", "channels", "aux_weight", "drop_path", "augment", "eval", "amp")


def segmentation_config(parent_cfg: dict, parent_hash: str, row: str, head: str, section: dict) -> dict:
    """A fine-tune's identity: its parent (row, config hash, model), the head and the recipe keys of the section."""
    missing = [k for k in RECIPE_KEYS if k not in section]
    if missing:
        raise ConfigError(f"params.yaml segmentation: missing {', '.join(missing)} (see defaults.segmentation)")
    return {"row": f"{row}+{head}", "init_from": row, "init_from_hash": parent_hash, "model": parent_cfg["model"],
            # canvases keep the classification path's normalisation; ADE20K images take ImageNet's
            "data_kind": "canvases" if section["dataset"] == "canvases" else "imagefolder", "head": head,
            **{k: section[k] for k in RECIPE_KEYS},
            # stochastic depth per backbone (timm name) where the recipe names one (mmsegmentation: Swin 0.3, DeiT 0.1)
            "drop_path": (section.get("model_drop_path") or {}).get(parent_cfg["model"], section["drop_path"])}


def build_segmenter(cfg: dict, parent_checkpoint: Path, num_classes: int):
    """The parent's reported weights (its EMA if any) at the crop size, classifier dropped, with the head."""
    from tlvit.evaluate import load_for_eval
    from tlvit.models.segmenter import Segmenter

    setup = load_for_eval(parent_checkpoint, num_classes=num_classes, data_kind=cfg["data_kind"],
                          img_size=cfg["augment"]["crop_size"], drop_path=cfg["drop_path"])
    backbone = setup.model
    backbone.reset_classifier(0)
    return Segmenter(backbone, cfg["head"], num_classes, channels=cfg["channels"], aux_weight=cfg["aux_weight"]), setup


def lr_factor(it: int, cfg: dict) -> float:
    """mmsegmentation's schedule: poly decay by iteration (to 0), times a linear warm-up from `warmup_ratio`."""
    factor = (1 - it / cfg["iterations"]) ** cfg["poly_power"]
    if it < cfg["warmup_iters"]:
        k = it / cfg["warmup_iters"]
        factor *= cfg["warmup_ratio"] + (1 - cfg["warmup_ratio"]) * k
    return factor


class _Batches(torch.utils.data.Dataset):
    """Item it = iteration it's (local share of the) batch: samples drawn with per-(seed, iteration, slot) streams."""

    def __init__(self, dataset, geometry, seed: int, start: int, stop: int, batch: int, rank: int, world: int):
        self.dataset, self.geometry, self.seed = dataset, geometry, seed
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        from tlvit.data.datasets import hash_seed

        it = self.start + i
        idx = batch_indices(self.seed, it, self.batch, len(self.dataset))
        xs, ys = [], []
        for slot in range(self.rank, self.batch, self.world):
            rng = np.random.default_rng(hash_seed(self.seed, it, slot, 1))
            x, y = self.dataset.sample(int(idx[slot]), self.geometry, rng)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)


def train_segmenter(cfg: dict, seed: int, run_dir: Path, train_set, val_set, parent_checkpoint: Path, *,
                    tracking: bool = True, experiment: str = "tlvit-segmentation", tags: dict | None = None,
                    device: str | None = None, workers: int = 0, checkpoint_every: int = 0,
                    stop_after: int | None = None) -> dict:
    """Train (or resume) one fine-tune and score it; returns {"metrics": {...}, "config_hash", "mlflow_run_id"}.
    A finished run (result.json of this config) is read back, not trained again. stop_after: leave after that many
    iterations with a checkpoint (tests use it to interrupt a run)."""
    from tlvit.data.segmentation_sets import IGNORE_INDEX, Geometry

    run = IterationRun(cfg, seed, run_dir, device)
    done = run.finished()
    if done is not None:
        return done
    env, dev = run.env, run.device
    torch.manual_seed(seed)
    model, setup = build_segmenter(cfg, parent_checkpoint, train_set.num_classes)
    optimizer, start, resume_rng = run.begin(model, tracking=tracking, experiment=experiment, tags=tags)
    net = run.parallel(model)
    aug = cfg["augment"]
    geometry = Geometry(crop_size=aug["crop_size"], scale=tuple(aug["scale"]), ratio_range=tuple(aug["ratio_range"]),
                        hflip=aug["hflip"], photometric=aug["photometric"])
    stop = cfg["iterations"] if stop_after is None else min(cfg["iterations"], start + stop_after)
    batches = _Batches(train_set, geometry, seed, start, stop, cfg["batch_size"], env.rank, env.world_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers)
    amp = torch.bfloat16 if cfg.get("amp") == "bf16" and dev.type == "cuda" else None
    every = checkpoint_every or cfg["iterations"]
    net.train()
    it = start
    batches_iter = iter(loader)  # draws the loader's base seed from the global generator: before the restore
    if resume_rng is not None:  # dropout continues from where the interrupted run left it
        torch.set_rng_state(resume_rng)
    for x, y in batches_iter:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            logits, aux = net(x, with_aux=True)
            loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
            if aux is not None:
                loss = loss + cfg["aux_weight"] * F.cross_entropy(aux.float(), y, ignore_index=IGNORE_INDEX)
        it = run.step(model, optimizer, loss, it, lr=cfg["lr"] * lr_factor(it, cfg), stop=stop, every=every)
    if it < cfg["iterations"]:
        return run.interrupted(it)
    metrics = evaluate(model, val_set, {**cfg["eval"], "crop_size": aug["crop_size"]}, dev, amp=amp)
    result = run.finish(it, metrics, setup.source)
    log.info("%s seed %d: mIoU %.2f (MS %.2f), pixel acc %.2f", cfg["row"], seed, metrics["miou"], metrics["miou_ms"],
             metrics["pacc"])
    return result


def slide_logits(model, image: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits [C, H, W] of one image [3, H, W] from crop x crop windows `stride` apart (the last one flush with the
    edge), averaged where they overlap; an image smaller than the crop is padded (mmsegmentation's slide mode)."""
    _, h, w = image.shape
    ph, pw = max(h, crop), max(w, crop)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    out = image.new_zeros((num_classes, ph, pw))
    count = image.new_zeros((1, ph, pw))
    tops = sorted({min(t, ph - crop) for t in range(0, ph - crop + stride, stride)})
    lefts = sorted({min(s, pw - crop) for s in range(0, pw - crop + stride, stride)})
    windows = [(t, s) for t in tops for s in lefts]
    batch = torch.stack([padded[:, t:t + crop, s:s + crop] for t, s in windows])
    logits = model(batch).float()
    for (t, s), lg in zip(windows, logits):
        out[:, t:t + crop, s:s + crop] += lg
        count[:, t:t + crop, s:s + crop] += 1
    return (out / count)[:, :h, :w]


def scale_probs(model, image: torch.Tensor, eval_cfg: dict, num_classes: int, crop: int, ratio: float,
                flip: bool) -> torch.Tensor:
    """Class probabilities [C, H, W] at the image's size from the image resized by `ratio` (the mean over it and
    its mirror image with `flip`)."""
    _, h, w = image.shape
    size = (max(1, round(h * ratio)), max(1, round(w * ratio)))
    scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    total = image.new_zeros((num_classes, h, w))
    views = (False, True) if flip else (False,)
    for flipped in views:
        logits = slide_logits(model, scaled.flip(-1) if flipped else scaled, crop, eval_cfg["stride"], num_classes)
        if flipped:
            logits = logits.flip(-1)
        total += F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0].softmax(0)
    return total / len(views)


def scores(confusion: torch.Tensor) -> dict:
    """mmsegmentation's metrics (percent) from a confusion matrix [target, prediction] of the scored pixels: mean
    IoU and mean class accuracy over the classes that occur (in the target or, for IoU, in the prediction; a class
    with nothing to score is left out, not counted as 0 as torchmetrics' macro accuracy would), pixel accuracy."""
    confusion = confusion.double()
    hits, labelled, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    iou = hits / (labelled + predicted - hits)
    recall = hits / labelled
    return {"miou": 100.0 * float(iou.nanmean()), "pacc": 100.0 * float(hits.sum() / confusion.sum()),
            "macc": 100.0 * float(recall.nanmean())}


@torch.no_grad()
def evaluate(model, dataset, eval_cfg: dict, device, *, amp=None) -> dict:
    """mIoU, pixel accuracy and mean class accuracy (percent, `scores`), single-scale and (`_ms`) over eval_cfg
    `scales` with its `flip`; each image first fitted into eval_cfg `scale` (aspect kept). Under torch.distributed
    each process scores every world-th image and torchmetrics sums the confusion matrices. eval_cfg `crop_size`: the
    window (the backbone's input size)."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    from tlvit.data.segmentation_sets import IGNORE_INDEX, fit_scale
    from tlvit.distributed import init_distributed

    env = init_distributed()
    c = dataset.num_classes
    crop = eval_cfg["crop_size"]
    single, multi = (MulticlassConfusionMatrix(c, ignore_index=IGNORE_INDEX).to(device) for _ in range(2))
    model.eval()
    for i in range(env.rank, len(dataset), env.world_size):
        image, target = dataset[i]
        _, h, w = image.shape
        factor = fit_scale(h, w, tuple(eval_cfg["scale"]))
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].to(device)
        target = target.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            ss = scale_probs(model, image, eval_cfg, c, crop, 1.0, False)
            # multi-scale: the mean over the ratios (and flips); ratio 1 without flips is the single-scale result
            ms = sum(ss if r == 1.0 and not eval_cfg["flip"] else scale_probs(model, image, eval_cfg, c, crop, r,
                                                                               eval_cfg["flip"])
                     for r in eval_cfg["scales"]) / len(eval_cfg["scales"])
        # scored at the annotation's own size, as mmsegmentation does
        for probs, meter in ((ss, single), (ms, multi)):
            pred = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
            meter.update(pred[None], target[None])
    out = scores(single.compute())
    out.update({f"{k}_ms": v for k, v in scores(multi.compute()).items()})
    return out


def planned_runs(trained: list[str], tables: dict[str, dict], section: dict, params_path: str = "params.yaml",
                 ) -> list[tuple[str, str]]:
    """(row, head) fine-tunes, each head one of `heads`: `rows: tables` the tables' (row, head) entries whose row the
    preset trains; `all` every trained row with each head; `none` nothing."""
    from tlvit.models.segmenter import HEADS

    which = section.get("rows", "tables")
    heads = list(section.get("heads", HEADS) or ())
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ConfigError(f"{params_path}: segmentation.heads: unknown head {unknown[0]!r} (use {', '.join(HEADS)})")
    if which == "none":
        return []
    if which == "all":
        return [(row, head) for row in trained for head in heads]
    if which != "tables":
        raise ConfigError(f"{params_path}: segmentation.rows must be `tables`, `all` or `none`, not {which!r}")
    wanted = [(r["row"], r["head"]) for t in tables.values() for r in t["rows"] if r["row"] in trained
              and r["head"] in heads]
    return list(dict.fromkeys(wanted))


def fine_tune_rows(layout, trained: list[str], tables: dict[str, dict], section: dict, seeds_of, *,
                   params_path: str = "params.yaml", tracking: bool = True) -> dict:
    """Every planned (row, head) fine-tuned from each finished seed of its row; returns the stage's record:
    {"dataset", "present", "runs": [{"row", "head", "seeds": [{seed, <metric>: value, ...}]}]}."""
    from tlvit.data.datasets import DATA_STATS
    from tlvit.data.segmentation_sets import SegmentationSet

    runs_root = layout.root / "runs" / layout.preset / "segmentation"
    runs_root.mkdir(parents=True, exist_ok=True)  # the stage's output exists even when it has nothing to fine-tune
    plan = planned_runs(trained, tables, section, params_path)
    kind = section.get("dataset", "canvases")
    if kind != "canvases":
        root = Path(section.get("source") or "")
        if not section.get("source") or not root.is_dir():  # not on disk: reported as not present, never a number
            return {"dataset": kind, "present": False, "runs": [{"row": r, "head": h, "seeds": []} for r, h in plan]}
    sets = None
    out = []
    for row, head in plan:
        seeds = []
        for seed in seeds_of(row):
            if sets is None:  # read once, and only when something is fine-tuned
                if kind == "canvases":
                    root = layout.dataset()["root"]
                mean, std = DATA_STATS["canvases" if kind == "canvases" else "imagefolder"]
                sets = {s: SegmentationSet(kind, root, s, mean, std) for s in ("train", "val")}
            parent = layout.run_dir(row, seed) / "checkpoint.pt"
            ckpt = torch.load(parent, map_location="cpu", weights_only=True)
            cfg = segmentation_config(ckpt["config"], ckpt["config_hash"], row, head, section)
            res = train_segmenter(cfg, seed, runs_root / head / row / f"seed{seed}", sets["train"], sets["val"], parent,
                                  tracking=tracking, experiment=f"tlvit-{layout.preset}-segmentation",
                                  tags={"segmentation_head": head, "parent_row": row},
                                  workers=int(section.get("workers", 0)),
                                  checkpoint_every=int(section.get("checkpoint_every", 0)))
            seeds.append({"seed": seed, **res["metrics"], "config_hash": res["config_hash"],
                          "mlflow_run_id": res.get("mlflow_run_id")})
        out.append({"row": row, "head": head, "seeds": seeds})
    return {"dataset": kind, "present": True, "runs": out}
