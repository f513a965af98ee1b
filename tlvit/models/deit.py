"""DeiT-T/S/B (Touvron et al., 2021) whose attention maps can be read, for TL-Align (Xiao et al., 2023).

timm's ``deit_*_patch16_224`` are ``VisionTransformer(patch_size=16, embed_dim, depth, num_heads)``
with qkv bias, MLP ratio 4 and LayerNorm(eps=1e-6). :class:`~tlvit.models.lvvit.LvViT` with a single
16x16 patch conv, ``skip_lam=1`` and no aux head is that same network, with the same parameter names
(``patch_embed.proj``, ``blocks.i.attn.qkv``, ``head``, ...): timm's DeiT weights load strictly and
give the same logits (tests/test_models.py checks this). Building DeiT on LvViT rather than
subclassing timm's VisionTransformer gives it the harness's training interface (``forward_train``
with MixToken, ``attn_callback`` / ``return_attn``, an optional ``aux_head``) without a second copy,
and keeps it independent of VisionTransformer's constructor, which changes across timm releases.

Registered as ``tlvit_deit_*`` so timm's own ``deit_*`` stay untouched. ``deit_e`` is the embedded
analog of the Table 3 baseline (DeiT-S) of LV-ViT.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from .lvvit import EMBEDDED_ARGS, LvViT, _create_lvvit

__all__ = ["DEIT_ARGS"]

# What every DeiT shares, as LvViT arguments; timm's deit_* use the same values.
DEIT_ARGS = dict(
    mlp_ratio=4., qkv_bias=True, skip_lam=1., stem_kernels=(16,), stem_strides=(16,), norm_eps=1e-6,
    aux_head=False, inference_mode="cls",
)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": ("head", "aux_head"),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "tlvit_deit_tiny_patch16_224": _cfg(),
    "tlvit_deit_small_patch16_224": _cfg(),
    "tlvit_deit_base_patch16_224": _cfg(),
    "deit_e": _cfg(num_classes=10, input_size=(3, 64, 64), crop_pct=1.0),
})


def _create_deit(variant: str, pretrained: bool = False, **kwargs) -> LvViT:
    # Caller kwargs win, e.g. aux_head=True for token labeling on DeiT.
    return _create_lvvit(variant, pretrained, **dict(DEIT_ARGS, **kwargs))


@register_model
def tlvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LvViT:
    """DeiT-T: 12 blocks, dim 192, 3 heads, 5.7M params."""
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create_deit("tlvit_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tlvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> LvViT:
    """DeiT-S: 12 blocks, dim 384, 6 heads, 22M params."""
    model_args = dict(embed_dim=384, depth=12, num_heads=6)
    return _create_deit("tlvit_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def tlvit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> LvViT:
    """DeiT-B: 12 blocks, dim 768, 12 heads, 86M params."""
    model_args = dict(embed_dim=768, depth=12, num_heads=12)
    return _create_deit("tlvit_deit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_e(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded DeiT-S analog: 3 blocks (3/4 of lvvit_e's 4, as 12 is of 16), MLP 4, one 8x8 patch conv."""
    model_args = dict(EMBEDDED_ARGS, depth=3, stem_kernels=(8,), stem_strides=(8,))
    return _create_deit("deit_e", pretrained, **dict(model_args, **kwargs))
