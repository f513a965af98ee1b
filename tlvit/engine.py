"""One epoch of training and one evaluation (DeiT's engine.py, with dense targets and MixToken)."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from tlvit.distributed import all_reduce_sum
from tlvit.supervision import Supervision


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step, the samples and the last checkpoint."""


class TrainForward(nn.Module):
    """Wraps `model.forward_train` as `forward`, so DistributedDataParallel sees (and syncs) the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mix_box=None, attn_callback=None):
        return self.model.forward_train(x, mix_box=mix_box, attn_callback=attn_callback)


def train_one_epoch(
    net: nn.Module,
    model: nn.Module,
    loader: Iterable,
    supervision: Supervision,
    optimizer: torch.optim.Optimizer,
    scheduler,
    epoch: int,
    device: torch.device,
    *,
    generator: torch.Generator,
    ema=None,
    clip_grad: float | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    last_checkpoint: str = "none",
    show_progress: bool = True,
) -> dict:
    """Train `net` (model or its DDP wrapper around TrainForward) for one epoch; returns mean stats."""
    net.train()
    steps = len(loader)
    loss_sum, seen, t0 = 0.0, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_progress)
    for step, batch in enumerate(bar):
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cls_target, token_target = supervision.targets(batch, device)
        x, cls_target, token_target, box, aligner = supervision.mix_batch(
            x, batch["label"].to(device), cls_target, token_target, generator)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net(x, mix_box=box, attn_callback=aligner)
            if aligner is not None:  # TL-Align: the labels travelled with the attention of this forward pass
                cls_target = supervision.aligned_target(aligner)
            loss = supervision(out, cls_target, token_target)
        if not math.isfinite(loss.item()):
            ids = batch["index"].tolist()
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1}/{steps} "
                                f"(sample ids {ids[:16]}{'...' if len(ids) > 16 else ''}); last good checkpoint: {last_checkpoint}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss so small gradients survive; unscale before clipping
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        if ema is not None:
            ema.update(model, step=epoch * steps + step + 1)
        loss_sum += loss.item() * len(x)
        seen += len(x)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        ips=f"{seen / (time.time() - t0):.0f}")
    return {"train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / (time.time() - t0)}


def inference_logits(model: nn.Module, x: torch.Tensor, modes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Logits [B, C] per inference mode: 'cls' (class token) and/or 'cls_plus_aux' (cls + 0.5 max aux, LV-ViT's).
    A model without `forward_train` (any timm classifier) has 'cls' only: its plain output."""
    if not hasattr(model, "forward_train"):
        return {"cls": model(x)}
    out = model.forward_train(x)
    return {m: out.cls_logits if m == "cls" else out.cls_logits + 0.5 * out.token_logits.max(1)[0] for m in modes}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, modes: tuple[str, ...] = ("cls",),
             amp_dtype: torch.dtype | None = None, on_logits: Callable[[torch.Tensor], None] | None = None) -> dict:
    """Top-1/top-5 (%) per inference mode: 'cls' (class token) and/or 'cls_plus_aux' (cls + 0.5 max aux).

    The first mode gives the unsuffixed `top1`/`top5`; counts are summed over processes. `on_logits` sees the
    first mode's logits of every batch, in loader order (e.g. ImageNet-ReaL's scorer).
    """
    model.eval()
    counts = torch.zeros(len(modes), 2, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = inference_logits(model, x, modes)
        for j, m in enumerate(modes):
            top5 = logits[m].topk(min(5, logits[m].shape[1]), 1).indices
            counts[j, 0] += (top5[:, 0] == y).sum().item()
            counts[j, 1] += (top5 == y[:, None]).any(1).sum().item()
        if on_logits is not None:
            on_logits(logits[modes[0]])
        total += len(x)
    all_reduce_sum(counts)
    all_reduce_sum(total)
    stats = {}
    for j, m in enumerate(modes):
        suffix = "" if j == 0 else f"_{m}"
        stats[f"top1{suffix}"] = 100.0 * counts[j, 0].item() / total.item()
        stats[f"top5{suffix}"] = 100.0 * counts[j, 1].item() / total.item()
    return stats
