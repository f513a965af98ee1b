"""The machine annotator: any timm classifier, applied densely to produce score maps.

Dense application = the model's own classifier used as a 1x1 conv over its feature map (CNNs,
e.g. `dm_nfnet_f6` at 576 px -> 18 x 18) or over its patch tokens (ViTs; LV-ViT's `aux_head`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tlvit.labels.geometry import WholeImageGeometry
from tlvit.labels.score_maps import ScoreMapStore, ScoreMapWriter


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_annotator(name: str, num_classes: int, pretrained: bool = False, checkpoint: str | None = None) -> nn.Module:
    """timm model by name; `checkpoint` loads local weights through timm's pretrained path.

    With pretrained=True and no checkpoint, timm fetches its published weights (on a cluster); here
    nothing can be downloaded, so tests use a checkpoint this pipeline trained itself.
    """
    import timm

    import tlvit.models  # noqa: F401  (registers our models, incl. the embedded annotator)

    kwargs: dict = {"num_classes": num_classes}
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint}: annotator checkpoint not found; fix `annotator.checkpoint` in params.yaml")
        # the checkpoint was trained for this dataset: say so, or timm drops its classifier whenever
        # num_classes differs from the architecture's default cfg (a silently random annotator head)
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint), "num_classes": num_classes}
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, **kwargs)


@torch.no_grad()
def dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-location class logits [B, C, h, w] of an image batch [B, 3, H, W]."""
    return _dense_logits(model, x)


def _dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    feats = model.forward_features(x)
    if feats.ndim == 4:  # CNN feature map [B, D, h, w]: classifier as a 1x1 conv
        head = model.get_classifier()
        if isinstance(head, nn.Conv2d):
            return head(feats)
        return torch.einsum("bdhw,cd->bchw", feats, head.weight) + head.bias[None, :, None, None]
    # ViT tokens [B, P + N, D]: drop the prefix (class/register) tokens, classify each patch token
    prefix = getattr(model, "num_prefix_tokens", 1)
    tokens = feats[:, prefix:]
    head = getattr(model, "aux_head", None)
    head = model.get_classifier() if head is None else head
    logits = head(tokens)  # [B, N, C]
    gh, gw = model.token_grid if hasattr(model, "token_grid") else model.patch_embed.grid_size
    return logits.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


IGNORE = -100  # F.cross_entropy's ignore_index: locations without a label


def cell_targets(gt_maps: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Per-location labels [N, h, w] from pixel class maps [N, S, S] (255 = background).

    Each map location covers an (S/h x S/w) cell of pixels; its label is the class with the most ink
    pixels there (the digit the location sees most of), IGNORE where the cell has no ink: background
    says nothing about which digit a location should name.
    """
    n, s, _ = gt_maps.shape
    h, w = grid
    if s % h or s % w:
        raise ValueError(f"ground-truth maps of {s} px do not split into a {h}x{w} grid of whole cells")
    gt = torch.from_numpy(np.asarray(gt_maps)).long().clamp(max=10)  # 10 = background
    # [N, pixels of a cell, h, w]: the class of every pixel of every cell, counted per class below
    pixels = gt.reshape(n, h, s // h, w, s // w).permute(0, 2, 4, 1, 3).reshape(n, -1, h, w)
    counts = torch.zeros(n, 11, h, w).scatter_add_(1, pixels, torch.ones(pixels.shape))
    ink = counts[:, :10]
    labels = ink.argmax(1)
    labels[ink.sum(1) == 0] = IGNORE
    return labels


def train_annotator(model: nn.Module, train_ds: Dataset, *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int, dense: bool = True, cells: torch.Tensor | None = None,
                    log=print) -> list[dict]:
    """Supervised training (AdamW, cosine, label smoothing 0.1); per-epoch stats.

    Image labels: dense=True puts the loss on every location of the dense map (the classifier as a
    1x1 conv, exactly as it is used to annotate) instead of on the pooled logits: pooling only
    constrains the average of the locations, not each one (measured comparison in docs/annotator.md).
    cells [N, h, w] (cell_targets): each location's own label instead, from how the training canvases
    were composed; the dataset must then show whole canvases (no crop), so locations and cells agree.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=0, drop_last=True)
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=epochs, warmup_epochs=min(1, epochs - 1),
                                   warmup_lr=lr / 100, min_lr=lr / 100, updates_per_epoch=len(loader))
    history = []
    for epoch in range(epochs):
        model.train()
        t0, total, correct, loss_sum = time.time(), 0, 0, 0.0
        for step, batch in enumerate(tqdm(loader, desc=f"annotator epoch {epoch + 1}/{epochs}", leave=False)):
            if cells is not None or dense:
                maps = _dense_logits(model, batch["image"])  # [B, C, h, w]
                if cells is not None:
                    labels = cells[batch["index"]]
                    if labels.shape[1:] != maps.shape[2:]:
                        raise ValueError(f"annotator map {tuple(maps.shape[2:])} does not match the label cells "
                                         f"{tuple(labels.shape[1:])}; the canvases must be shown whole, at their own size")
                else:
                    labels = batch["label"][:, None, None].expand(-1, *maps.shape[2:])
                loss = F.cross_entropy(maps, labels, label_smoothing=0.1, ignore_index=IGNORE)
                logits = maps.mean((2, 3))  # = the pooled classifier's logits (the head is linear)
            else:
                logits = model(batch["image"])
                loss = F.cross_entropy(logits, batch["label"], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * len(loader) + step + 1)
            total += len(logits)
            correct += (logits.argmax(1) == batch["label"]).sum().item()
            loss_sum += loss.item() * len(logits)
        sched.step(epoch + 1)
        history.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_top1": 100 * correct / total,
                        "images_per_s": total / (time.time() - t0)})
        log(f"annotator epoch {epoch + 1}: loss {loss_sum / total:.3f} train top-1 {100 * correct / total:.1f}%")
    return history


def inference_setup(device: str | torch.device | None) -> tuple[torch.device, contextlib.AbstractContextManager, int]:
    """(device, autocast context, loader workers) for annotator inference: a GPU when there is one, in bf16
    with loader workers (an NFNet-F6 forward at 576 px takes seconds on a CPU); the CPU in float32, in process."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return dev, torch.autocast("cuda", torch.bfloat16), min(8, os.cpu_count() or 1)
    return dev, contextlib.nullcontext(), 0


@torch.no_grad()
def image_accuracy(model: nn.Module, ds: Dataset, batch_size: int = 256,
                   device: str | torch.device | None = "cpu") -> float:
    """Image-level top-1 (%) of the annotator on a split (device None: a GPU when there is one)."""
    dev, autocast, workers = inference_setup(device)
    model.eval().to(dev)
    correct = 0
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=dev.type == "cuda"):
        with autocast:
            logits = model(batch["image"].to(dev, non_blocking=True))
        correct += (logits.argmax(1).cpu() == batch["label"]).sum().item()
    return 100.0 * correct / len(ds)


@torch.no_grad()
def generate_score_maps(model: nn.Module, ds: Dataset, out: str | Path, *, k: int, batch_size: int,
                        meta: dict, device: str | torch.device | None = "cpu", chunk: int = 512, shard: int = 0,
                        num_shards: int = 1) -> ScoreMapStore | None:
    """Run the annotator densely over every image of `ds` (whole image, resized) and store top-k.

    Resumable: chunks already on disk (from a killed run with the same settings) are not recomputed.
    Shardable: process `shard` of `num_shards` computes chunks c with c % num_shards == shard; the
    store appears when the last shard finishes (the others return None).
    `ds` must use `WholeImageGeometry` so the map covers exactly the whole image (a centre crop would
    shift every token label of a non-square image against its crop).
    """
    if not isinstance(ds.geometry, WholeImageGeometry):
        raise ValueError(f"score maps must cover whole images: build the dataset with WholeImageGeometry, "
                         f"not {type(ds.geometry).__name__}")
    device, autocast, workers = inference_setup(device)  # None: a GPU (bf16, loader workers) when there is one
    model.eval().to(device)
    with autocast:
        probe = dense_logits(model, ds[0]["image"][None].to(device))
    num_classes, grid = probe.shape[1], tuple(probe.shape[2:])
    k = min(k, num_classes)
    # the images themselves (names and byte sizes) belong to the settings: a run resumed after the list changed
    # (same count, one image replaced) must not keep the old image's maps under the new name
    meta = {**meta, "images_sha256": images_fingerprint(ds.split_dir, ds.paths)}
    writer = ScoreMapWriter(out, num_images=len(ds), k=k, grid=grid, num_classes=num_classes, meta=meta, chunk=chunk)
    pending = writer.pending_chunks(shard, num_shards)
    bar = tqdm(total=sum(len(writer.chunk_range(c)) for c in pending), desc="score maps", unit="img")
    for c in pending:
        idx = list(writer.chunk_range(c))
        subset = torch.utils.data.Subset(ds, idx)
        vals, ids = [], []
        for batch in DataLoader(subset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"):
            with autocast:
                logits = dense_logits(model, batch["image"].to(device, non_blocking=True)).float()
            v, i = logits.topk(k, dim=1)
            vals.append(v.half().cpu().numpy())
            ids.append(i.cpu().numpy())
            bar.update(len(logits))
        writer.write_chunk(c, np.concatenate(vals), np.concatenate(ids))
    bar.close()
    if any(not writer.is_done(c) for c in range(writer.num_chunks)):
        return None  # other shards are still writing; the last one to finish publishes the store
    sizes = []
    for p in ds.paths:
        with Image.open(ds.split_dir / p) as img:  # header only: cheap
            sizes.append(img.size)
    return writer.finish(ds.paths, sizes)


def images_fingerprint(root: Path, paths: list[str]) -> str:
    """sha256 of the relative paths and byte sizes of a split's images (a stat each, no reading)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0{(Path(root) / p).stat().st_size}\n".encode())
    return h.hexdigest()


def dense_label_accuracy(store: ScoreMapStore, gt_maps: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> dict:
    """Accuracy of the store's argmax map against ground-truth class maps (255 = background).

    Each ground-truth pixel is scored against the map location that covers it (nearest, since the
    map covers the whole image). Reports overall / primary-digit / secondary-digit pixels and per class.
    Row i of the maps must be the store's image i: `load_gt_maps(..., expect_paths=store.index["paths"])`.
    """
    top1 = np.asarray(store.classes[:, 0])  # argmax = first of the top-k (topk returns sorted values)
    n, h, w = top1.shape
    S = gt_maps.shape[1]
    ys = (np.arange(S) * h) // S
    xs = (np.arange(S) * w) // S
    pred = top1[:, ys][:, :, xs]  # [N, S, S]
    labels = np.asarray(gt_labels)
    fg = gt_maps != 255
    primary = fg & (gt_maps == labels[:, None, None])
    secondary = fg & ~primary
    correct = pred == gt_maps
    out = {
        "dense_acc": 100.0 * correct[fg].mean(),
        "dense_acc_primary": 100.0 * correct[primary].mean(),
        "dense_acc_secondary": 100.0 * correct[secondary].mean(),
    }
    for c in range(num_classes):
        m = gt_maps == c
        out[f"dense_acc_class{c}"] = 100.0 * correct[m].mean() if m.any() else float("nan")
    return {k: round(float(v), 3) for k, v in out.items()}
