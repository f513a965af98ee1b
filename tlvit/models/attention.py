"""Multi-head self-attention that can hand out its attention map (for TL-Align).

By default attention runs through ``F.scaled_dot_product_attention`` and no [B, H, N, N] matrix is
kept. When a caller passes ``attn_callback``, the layer takes the explicit softmax(QK^T / sqrt(d))
path instead and calls ``attn_callback(attn_mean)`` with the head-averaged map [B, N, N] (softmax
output, before dropout): TL-Align (its Eq. 9) mixes token labels with exactly this matrix.

Parameter names match ``timm.layers.Attention`` (``qkv``, ``proj``), so timm ViT/DeiT checkpoints load.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn

__all__ = ["Attention", "AttnCallback"]

AttnCallback = Callable[[torch.Tensor], None]  # receives the head-averaged attention [B, N, N]


class Attention(nn.Module):
    """Self-attention [B, N, C] -> [B, N, C]; optionally reports the head-averaged attention [B, N, N]."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # Follows timm's global switch (TIMM_FUSED_ATTN / timm.layers.set_fused_attn); tests flip it per layer.
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_callback: Optional[AttnCallback] = None) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]; with `attn_callback`, it is called once with the detached [B, N, N] map."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        if attn_callback is None and self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
            if attn_callback is not None:
                # Detached: TL-Align treats the aligned labels as fixed targets (stop-gradient, its Eq. 12),
                # so gradients must not flow from the target back into the attention weights.
                attn_callback(attn.detach().mean(dim=1))
            x = self.attn_drop(attn) @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
