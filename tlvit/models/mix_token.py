"""MixToken (LV-ViT Sec. 3.3): CutMix applied to patch tokens instead of pixels.

One box per batch on the token grid. Inside it, image b's tokens are replaced by the tokens of image
B-1-b (``x.flip(0)``) right after patch embedding; after the transformer the token outputs inside the
box are swapped back, so token ``i`` of output ``b`` always describes image ``b``'s content at grid
position ``i`` and dense targets need no mixing. Only the class-token target is mixed, by ``lam``.

The box is half-open ``(y0, y1, x0, x1)`` in token units. This is the only place that implements the
mixing; the models call :func:`mix_tokens` / :func:`unmix_tokens` and the engine calls
:func:`sample_token_box`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["BOX_SAMPLERS", "Box", "sample_token_box", "token_box_mask", "mix_tokens", "unmix_tokens"]

Box = Tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, token-grid units


def _beta(generator: torch.Generator, alpha: float) -> float:
    """One Beta(alpha, alpha) draw whose randomness comes only from `generator`."""
    # torch.distributions.Beta cannot take a generator; seed a numpy Generator from ours instead, so a
    # seeded torch.Generator reproduces the whole box (and resuming a run reproduces its boxes).
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


BOX_SAMPLERS = ("authors", "rounded")


def sample_token_box(
        grid_hw: Tuple[int, int],
        generator: torch.Generator,
        alpha: float = 1.0,
        sampler: str = "authors",
) -> Tuple[Box, float]:
    """Sample a CutMix-style box on a (Gh, Gw) grid; returns (box, lam), lam = exact share of own cells kept.

    lam_raw ~ Beta(alpha, alpha), side ratio sqrt(1 - lam_raw), centre uniform on the grid, box clipped.
    sampler="authors" (default): the reference CutMix sampler that LV-ViT's MixToken, TL-Align's
    token CutMix and timm's pixel CutMix all use: side int(G * ratio) (truncated) and the box
    [c - side // 2, c + side // 2), so sides are even and a side below 2 gives an empty box.
    sampler="rounded": side round(G * ratio), box [c - side // 2, c - side // 2 + side) (tlvit's earlier
    sampler; a deviation switch, `augment.box_sampler`). The authors' mixes fewer cells on average
    (14x14 grid: 0.27 vs 0.32 of the tokens with lam_raw ~ U(0, 1); tests/test_mixing.py pins both).
    """
    if sampler not in BOX_SAMPLERS:
        raise ValueError(f"box sampler must be one of {BOX_SAMPLERS}, not {sampler!r}")
    gh, gw = (int(s) for s in grid_hw)
    lam_raw = _beta(generator, alpha)
    cut_ratio = math.sqrt(1.0 - lam_raw)
    cy = int(torch.randint(0, gh, (1,), generator=generator))
    cx = int(torch.randint(0, gw, (1,), generator=generator))
    if sampler == "authors":
        cut_h, cut_w = int(gh * cut_ratio), int(gw * cut_ratio)
        y0, y1 = min(max(cy - cut_h // 2, 0), gh), min(cy + cut_h // 2, gh)
        x0, x1 = min(max(cx - cut_w // 2, 0), gw), min(cx + cut_w // 2, gw)
    else:
        cut_h, cut_w = round(gh * cut_ratio), round(gw * cut_ratio)
        y0, x0 = cy - cut_h // 2, cx - cut_w // 2
        y0, y1 = max(y0, 0), min(y0 + cut_h, gh)
        x0, x1 = max(x0, 0), min(x0 + cut_w, gw)
    y1, x1 = max(y1, y0), max(x1, x0)
    # Clipping (and the sampler's rounding) change the area, so lam is recomputed from the box actually
    # used, as both authors' codes do: the class target weights each image by the cells it contributes.
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (gh * gw)
    return (y0, y1, x0, x1), lam


def token_box_mask(grid_hw: Tuple[int, int], box: Box, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean [Gh, Gw] mask, True inside the half-open box."""
    gh, gw = (int(s) for s in grid_hw)
    y0, y1, x0, x1 = (int(b) for b in box)
    if not (0 <= y0 <= y1 <= gh and 0 <= x0 <= x1 <= gw):
        raise ValueError(f"box {box} is not a half-open box inside the {gh}x{gw} token grid")
    mask = torch.zeros(gh, gw, dtype=torch.bool, device=device)
    mask[y0:y1, x0:x1] = True
    return mask


def mix_tokens(tokens: torch.Tensor, box: Box, grid_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Replace tokens inside `box` by those of the flipped batch; [B, N, C] (needs grid_hw) or [B, C, H, W]."""
    if tokens.ndim == 4:
        mask = token_box_mask(tokens.shape[-2:], box, tokens.device)[None, None]  # [1, 1, H, W]
    elif tokens.ndim == 3:
        if grid_hw is None:
            # N alone does not determine the grid (4x16 and 8x8 both give 64), so do not guess.
            raise ValueError("mix_tokens on [B, N, C] tokens needs grid_hw")
        if grid_hw[0] * grid_hw[1] != tokens.shape[1]:
            raise ValueError(f"grid {tuple(grid_hw)} does not hold {tokens.shape[1]} tokens")
        mask = token_box_mask(grid_hw, box, tokens.device).reshape(1, -1, 1)  # [1, N, 1]
    else:
        raise ValueError(f"expected [B, N, C] or [B, C, H, W] tokens, got shape {tuple(tokens.shape)}")
    # torch.where instead of in-place assignment: no clone, and autograd routes gradients correctly.
    return torch.where(mask, tokens.flip(0), tokens)


def unmix_tokens(tokens: torch.Tensor, box: Box, grid_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Undo :func:`mix_tokens` on per-token outputs (the swap with the flipped batch is its own inverse)."""
    return mix_tokens(tokens, box, grid_hw)
