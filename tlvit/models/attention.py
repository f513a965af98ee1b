"""Multi-head self-attention that can hand out its attention map (for TL-Align).

Attention runs through ``F.scaled_dot_product_attention`` and no [B, H, N, N] matrix is kept, also
when a caller passes ``attn_callback``: the layer then calls ``attn_callback(AttentionMap(...))``, a
handle on the block's detached head-averaged softmax(QK^T / sqrt(d)) (before dropout) that computes
only what its reader asks for, under ``no_grad``:

* ``attn_map @ v`` (:meth:`AttentionMap.apply`): the map applied to a few columns v [B, N, m], or to
  some of its rows only. This is all TL-Align needs (its Eq. 9 mixes token labels with this matrix, and
  ``tlvit.tl_align`` keeps the labels as a few coefficients per token), so the model's own attention
  stays fused, and its backward unchanged, while the labels are moved.
* ``attn_map.mean()``: the whole map [B, N, N] (report figures, ``return_attn``).

A callback with ``needs_dense_map = True`` makes the layer take the explicit softmax(QK^T) path for
its own output, so the map it hands out is already computed (one QK^T for both); so does
``fused_attn = False``.

Parameter names match ``timm.layers.Attention`` (``qkv``, ``proj``), so timm ViT/DeiT checkpoints load.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn

__all__ = ["Attention", "AttentionMap", "AttnCallback"]


class AttentionMap:
    """One block's head-averaged softmax attention, detached, computed only as far as it is read.

    q, k: [B, H, N, d] queries and keys of the block (detached); scale: the softmax temperature;
    probs: the [B, H, N, N] softmax when the layer computed it anyway (explicit path), else None.
    Nothing carries a gradient (TL-Align's stop-gradient, its Eq. 12).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, probs: Optional[torch.Tensor] = None) -> None:
        self.q, self.k, self.scale = q.detach(), k.detach(), scale
        self._probs = None if probs is None else probs.detach()
        self._mean: Optional[torch.Tensor] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(B, N, N), the shape of the head-averaged map."""
        B, _, N, _ = self.q.shape
        return B, N, N

    def mean(self) -> torch.Tensor:
        """The head-averaged map [B, N, N] (rows sum to 1), in the attention's dtype; computed once."""
        if self._mean is None:
            with torch.no_grad():
                p = self._probs if self._probs is not None else \
                    ((self.q * self.scale) @ self.k.transpose(-2, -1)).softmax(dim=-1)
                self._mean = p.mean(dim=1)
        return self._mean

    def apply(self, v: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """mean over heads of softmax(q k^T * scale)[:, rows] @ v, i.e. ``self.mean()[:, rows] @ v``.

        v: [B, N, m], shared by all heads (m small: a few label coefficients); rows: a slice of the map's
        rows (default all). Returns [B, R, m] in v's dtype, without gradient, and autocast does not apply.
        Precision: a map the layer computed is used as is; otherwise it is formed in float32 or wider on
        the CPU (:func:`explicit_apply`), and on other devices by SDPA in q's dtype (:func:`sdpa_apply`).
        """
        rows = slice(None) if rows is None else rows
        v = v.detach()
        with torch.no_grad(), torch.autocast(v.device.type, enabled=False):
            if self._mean is not None:  # computed anyway: reuse it
                return _times_narrow(self._mean[:, rows].to(v.dtype), v)
            if self._probs is not None:  # per head, then the mean over heads: no [B, N, N] buffer
                return _times_narrow(self._probs[:, :, rows].to(v.dtype), v).mean(dim=1)
            q = self.q[:, :, rows]
            if q.device.type == "cpu":
                return explicit_apply(q, self.k, self.scale, v)
            return sdpa_apply(q, self.k, self.scale, v)

    __matmul__ = apply


def _times_narrow(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a [..., R, N] @ v [B, N, m] (broadcast over a's head dim, if any) for a narrow v, as (v^T a^T)^T:
    the same product, 2-4x faster on the CPU than the [R, N] x [N, m] form when m is a few columns."""
    vt = v.transpose(-2, -1)
    if a.ndim == 4:
        vt = vt[:, None]
    return torch.matmul(vt, a.transpose(-2, -1)).transpose(-2, -1)


def explicit_apply(q: torch.Tensor, k: torch.Tensor, scale: float, v: torch.Tensor) -> torch.Tensor:
    """mean_h softmax(q_h k_h^T * scale) @ v, formed explicitly: q [B, H, R, d], k [B, H, N, d],
    v [B, N, m] -> [B, R, m] in v's dtype (the map in float32 at least).

    For the CPU, where the fused kernel needs v's width to equal the head dim (else SDPA takes its math
    path, which measured 2x slower than this). One [B, H, R, N] buffer, exponentiated in place, and the
    softmax normalisation applied to the narrow product: fresh [B, H, N, N] buffers (a separate softmax
    output, a head mean) cost as much again on the CPU as the arithmetic.
    """
    dtype = torch.promote_types(q.dtype, v.dtype)
    if q.shape[2] <= 4:  # a few rows (the class row): elementwise, k read once where it lies, no copy of it
        s = (q.to(dtype).unsqueeze(3) * k.to(dtype).unsqueeze(2)).sum(dim=-1).mul_(scale)
    else:
        s = torch.matmul(q, k.transpose(-2, -1)).to(dtype).mul_(scale)  # [B, H, R, N] logits
    s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    z = s.sum(dim=-1, keepdim=True)  # [B, H, R, 1] softmax denominators
    return (_times_narrow(s, v.to(dtype)) / z).mean(dim=1).to(v.dtype)


def sdpa_apply(q: torch.Tensor, k: torch.Tensor, scale: float, v: torch.Tensor) -> torch.Tensor:
    """mean_h softmax(q_h k_h^T * scale) @ v via ``F.scaled_dot_product_attention``: q [B, H, R, d],
    k [B, H, N, d], v [B, N, m] -> [B, R, m] in v's dtype.

    v is cast to q's dtype, zero-padded to a multiple of 8 columns and shared by the heads. Which
    kernels accept a value width other than the head dim: on CUDA the memory-efficient kernel (widths
    multiples of 8 for 16-bit, 4 for float32) and cuDNN (multiples of 8, 16-bit only, its own layouts),
    not flash; on the CPU only the math path. SDPA picks among them and falls back to its math path (the
    explicit softmax(QK^T)), so this is always correct. In 16-bit, P and v enter the product rounded to
    that dtype and the result is rounded to it: ~2^-9 relative for bfloat16, below the rounding the
    16-bit logits already put into the map.
    """
    B, H, _, _ = q.shape
    n, m = v.shape[1], v.shape[2]
    width = -(-m // 8) * 8
    vv = torch.zeros(B, H, n, width, dtype=q.dtype, device=q.device)
    vv[..., :m] = v[:, None].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, vv, scale=scale)  # [B, H, R, width]
    return out[..., :m].to(v.dtype).mean(dim=1)


AttnCallback = Callable[[AttentionMap], None]  # receives the block's AttentionMap


class Attention(nn.Module):
    """Self-attention [B, N, C] -> [B, N, C]; optionally hands out its head-averaged map as an AttentionMap."""

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
        """x [B, N, C] -> [B, N, C]; with `attn_callback`, it is called once with the block's AttentionMap."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        probs = None
        if self.fused_attn and not getattr(attn_callback, "needs_dense_map", False):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
            x = self.attn_drop(probs) @ v
        if attn_callback is not None:
            # Detached: TL-Align treats the aligned labels as fixed targets (stop-gradient, its Eq. 12),
            # so gradients must not flow from the target back into the attention weights.
            attn_callback(AttentionMap(q, k, self.scale, probs))

        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
