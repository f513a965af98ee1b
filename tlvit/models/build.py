"""A row's model from its resolved run config (training, the report and the benchmarks all build it here)."""
from __future__ import annotations

import timm
import torch


def build_model(cfg: dict, num_classes: int) -> torch.nn.Module:
    """timm model named by cfg['model'] (registered by importing `tlvit.models`) with the row's constructor overrides."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    kwargs.setdefault("aux_head", cfg["supervision"]["kind"] == "token_labeling")
    return timm.create_model(cfg["model"], num_classes=num_classes, img_size=cfg["img_size"],
                             drop_path_rate=cfg["drop_path"], **kwargs)


def is_pyramid(model: torch.nn.Module) -> bool:
    """A hierarchical model (Swin) whose prediction pools its tokens: TL-Align's target is their mean label."""
    return getattr(model, "label_target", "cls") == "mean_tokens"
