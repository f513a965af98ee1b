"""Pyramid Vision Transformer (PVT-v2, Wang et al., 2022) with the harness's training interface, for TL-Align's Table 1
PVT rows.

TL-Align's Table 1 trains PVT-T/S, i.e. PVT v1 (Wang et al., 2021); timm implements only PVT-v2, so the PVT rows train
PVT-v2 at the size of each v1 model (b1 ~ PVT-T, b2 ~ PVT-S): a documented deviation (`pvt_v2`, docs/deviations.md).
v2 differs from v1 in its overlapping patch embeddings, the 3x3 depthwise conv in its MLP and its mean-pooled head
(v1 classifies a class token added at the last stage). The network is timm's ``PyramidVisionTransformerV2`` unchanged
(timm's checkpoints load); :class:`PvtTL` adds ``token_grid`` (the first stage's, stride 4) and ``forward_train``,
which aligns labels with :class:`tlvit.tl_align_pyramid.PyramidLabelAligner`.

Registered as ``tlvit_pvt_v2_*``; ``pvt_e`` is the embedded analog of PVT-T (64 px canvases, four stages of two
blocks on 16x16 -> 8x8 -> 4x4 -> 2x2 tokens, spatial reduction 4 / 2 / 1 / 1).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.pvt_v2 import PyramidVisionTransformerV2, checkpoint_filter_fn

from .pooled import PooledTraining

__all__ = ["PvtTL"]


class PvtTL(PooledTraining, PyramidVisionTransformerV2):
    """timm's PVT-v2, trainable by the harness (class prediction only: no token-labeling head)."""

    family = "PVT"

    def __init__(self, *args, img_size: int = 224, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        side = math.ceil(img_size / 4)  # the 7x7 stride-4 patch embedding with padding 3
        self._grid = (side, side)

    @property
    def token_grid(self) -> Tuple[int, int]:
        """(H, W) of the first stage's tokens (square inputs of the constructor's img_size)."""
        return self._grid


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PvtTL:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 2, 2))))))
    return build_model_with_cfg(PvtTL, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": .875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "tlvit_pvt_v2_b1": _cfg(),
    "tlvit_pvt_v2_b2": _cfg(),
    "pvt_e": _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
})


@register_model
def tlvit_pvt_v2_b1(pretrained: bool = False, **kwargs) -> PvtTL:
    """PVT-v2-b1 (14.0M params), the rows' PVT-T (13.2M)."""
    model_args = dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
    return _create_pvt("tlvit_pvt_v2_b1", pretrained, **dict(model_args, **kwargs))


@register_model
def tlvit_pvt_v2_b2(pretrained: bool = False, **kwargs) -> PvtTL:
    """PVT-v2-b2 (25.4M params), the rows' PVT-S (24.5M)."""
    model_args = dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
    return _create_pvt("tlvit_pvt_v2_b2", pretrained, **dict(model_args, **kwargs))


@register_model
def pvt_e(pretrained: bool = False, **kwargs) -> PvtTL:
    """Embedded PVT-T analog: 64 px, four stages of two blocks, dims 16 -> 64 (0.29M params), spatial reduction
    4 / 2 / 1 / 1."""
    model_args = dict(img_size=64, depths=(2, 2, 2, 2), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                      sr_ratios=(4, 2, 1, 1))
    return _create_pvt("pvt_e", pretrained, **dict(model_args, **kwargs))
