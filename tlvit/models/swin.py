"""Swin Transformer (Liu et al., 2021) with the harness's training interface, for TL-Align's Table 1 Swin rows.

The network is timm's ``SwinTransformer`` unchanged (same modules, parameter names and ``checkpoint_filter_fn``, so
timm's and the official Swin checkpoints load); :class:`SwinTL` only adds what the training loop reads: the first
stage's ``token_grid`` (where CutMix boxes and token labels live) and ``forward_train``, which aligns labels through
the model with :class:`tlvit.tl_align_pyramid.PyramidLabelAligner` when one is passed. A pooling model's target is
its output tokens' mean label, so rows set ``supervision.align_target: mean_tokens``.

Registered as ``tlvit_swin_*`` next to timm's ``swin_*``; ``swin_e`` is the embedded analog of Swin-T, scaled as the
DeiT analogs are (64 px canvases, 4x4 patches, windows of 4x4 tokens, three stages of two blocks).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from .pooled import PooledTraining

__all__ = ["SwinTL"]


class SwinTL(PooledTraining, SwinTransformer):
    """timm's Swin Transformer, trainable by the harness (class prediction only: no token-labeling head)."""

    family = "Swin"

    @property
    def token_grid(self) -> Tuple[int, int]:
        """(H, W) of the first stage's tokens."""
        return tuple(self.patch_embed.grid_size)


def _create_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinTL:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    return build_model_with_cfg(SwinTL, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": .9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "tlvit_swin_tiny_patch4_window7_224": _cfg(),
    "tlvit_swin_small_patch4_window7_224": _cfg(),
    "tlvit_swin_base_patch4_window7_224": _cfg(),
    "swin_e": _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(4, 4), crop_pct=1.0),
})


@register_model
def tlvit_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTL:
    """Swin-T: depths (2, 2, 6, 2), dim 96, 28M params."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_swin("tlvit_swin_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tlvit_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTL:
    """Swin-S: depths (2, 2, 18, 2), dim 96, 50M params."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_swin("tlvit_swin_small_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tlvit_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTL:
    """Swin-B: depths (2, 2, 18, 2), dim 128, 88M params."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_swin("tlvit_swin_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_e(pretrained: bool = False, **kwargs) -> SwinTL:
    """Embedded Swin-T analog: 64 px, 4x4 patches (16x16 tokens), windows of 4x4 tokens shifted by 2, three stages of
    two blocks (16x16 -> 8x8 -> 4x4 tokens; the last is one window, unshifted), dim 24 -> 96 (0.32M params)."""
    model_args = dict(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 4, 8))
    return _create_swin("swin_e", pretrained, **dict(model_args, **kwargs))
