"""The training interface of a mean-pooling timm model (Swin, PVT-v2): what the harness's loop reads of it.

A mixin in front of timm's class (``class SwinTL(PooledTraining, SwinTransformer)``): it refuses a token-labeling
head (LV-ViT's aux head is defined on a ViT's token sequence), says that TL-Align trains it against its output
tokens' mean label, and gives ``forward_train``, which aligns labels through the forward pass when a
:class:`tlvit.tl_align_pyramid.PyramidLabelAligner` is passed. The subclass gives ``token_grid``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .lvvit import TrainOutput

__all__ = ["PooledTraining"]


class PooledTraining:
    label_target = "mean_tokens"  # what TL-Align trains a pooling model against (tlvit.models.is_pyramid)
    family = "this model"  # named in the refusals

    def __init__(self, *args, aux_head: bool = False, **kwargs) -> None:
        if aux_head:
            raise ValueError(f"token labeling's auxiliary head is defined for ViT token sequences, not for {self.family}")
        super().__init__(*args, **kwargs)

    def forward_train(self, x: torch.Tensor, mix_box: Optional[Any] = None, attn_callback: Optional[Any] = None,
                      return_attn: bool = False) -> TrainOutput:
        """Class logits; with a :class:`~tlvit.tl_align_pyramid.PyramidLabelAligner` as `attn_callback`, its labels
        follow this forward pass. MixToken and returned attention maps are ViT features: refused here."""
        if mix_box is not None or return_attn:
            raise ValueError(f"MixToken and return_attn need a ViT's token sequence; {self.family} has neither")
        if attn_callback is None:
            return TrainOutput(self(x), None, None)
        if not hasattr(attn_callback, "attached"):
            raise TypeError(f"{self.family} aligns labels with a PyramidLabelAligner, not {type(attn_callback).__name__}")
        with attn_callback.attached(self):
            return TrainOutput(self(x), None, None)
