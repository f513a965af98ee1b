"""Image-level data mixing with the flipped batch (TL-Align Table 7, LV-ViT Table 6).

Every kind mixes sample b with its partner B-1-b (``x.flip(0)``), the convention of timm's batch-mode
Mixup and of MixToken, with one draw per batch, and takes all randomness from a passed CPU
``torch.Generator`` (same seed, same mix). What :func:`mix_images` returns says how much of each
image, and of each patch token, is the sample's own content, which is all that TL-Align
(``tlvit.tl_align``) and mixed token labels (:func:`mix_token_targets`) need.

kinds:
  none          no mixing (lam = 1)
  mixup         lam * x + (1 - lam) * x.flip(0), lam ~ Beta(alpha, alpha) (DeiT: alpha 0.8)
  cutmix        CutMix (Yun et al., 2019): a pixel box taken from the partner, lam = exact area share
  cutmix_patch  the same box drawn on the token grid, so it covers whole patches (TL-Align's CutMix)
  patch         random patch mixing (TL-Align Table 7 "Random", MAE-like): a random set of patches
  block         block-wise mixing (TL-Align Table 7 "Block-wise", BEiT-like): random rectangles of patches
  mixup_cutmix  DeiT's default: CutMix with probability switch_prob, else MixUp (Table 7 row 3)
  mixup_cutmix_patch  the same with patch-aligned CutMix: TL-Align's code (`TL_AlignMix`) switches
                between MixUp and token-grid CutMix (Table 7 row 3 + TL-Align)

Boxes follow the authors' CutMix sampler (truncated even sides, `sample_token_box`) unless
``sampler="rounded"``. ``lam`` is always the share of the sample's own content, recomputed from what
was actually swapped (box clipped at the border, patch counts truncated), the "corrected" lam of
timm's ``correct_lam``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# _beta: one Beta(alpha, alpha) draw from a torch.Generator; shared so MixToken and image mixing draw alike.
from tlvit.models.mix_token import _beta, sample_token_box

__all__ = ["KINDS", "Mixed", "mix_images", "mix_targets", "mix_token_targets"]

KINDS = ("none", "mixup", "cutmix", "cutmix_patch", "patch", "block", "mixup_cutmix", "mixup_cutmix_patch")


@dataclass
class Mixed:
    """A mixed batch and how much of it is each sample's own content."""

    images: torch.Tensor  # [B, 3, H, W] mixed images
    lam: float  # share of each image's own content (exact area share for box and patch kinds)
    # [Gh*Gw] float (one mask per batch; consumers also accept [B, Gh*Gw]): share of each token's pixels
    # from the sample's own image, 1 = own, 0 = partner, fractional for patches cut by a pixel box, lam for MixUp
    token_own: torch.Tensor
    box: Optional[Tuple[int, int, int, int]]  # pixel box (y0, y1, x0, x1), half-open, filled from the partner
    kind: str = "none"  # the kind actually applied (mixup_cutmix[_patch] resolves to mixup or cutmix[_patch])


def mix_images(
        x: torch.Tensor,
        kind: str,
        grid_hw: Tuple[int, int],
        generator: torch.Generator,
        alpha: float = 1.0,
        *,
        mixup_alpha: float = 0.8,
        switch_prob: float = 0.5,
        block_min_patches: int = 4,
        sampler: str = "authors",
) -> Mixed:
    """Mix images [B, 3, H, W] with x.flip(0) as `kind` on the model's (Gh, Gw) token grid.

    generator: a CPU torch.Generator, the only source of randomness (masks are drawn on the CPU, then moved).
    alpha: Beta(alpha, alpha) parameter of lam (for mixup_cutmix: of the CutMix branch).
    mixup_alpha, switch_prob: the MixUp alpha and the CutMix probability of `mixup_cutmix` (DeiT: 0.8, 0.5).
    block_min_patches: smallest block of the `block` kind, in patches (BEiT uses 16 on 14x14).
    sampler: box sampler of cutmix / cutmix_patch (`tlvit.models.mix_token.sample_token_box`) and count
        rule of `patch`: "authors" truncates as timm's CutMix and TL-Align's code do, "rounded" rounds.
    """
    if kind not in KINDS:
        raise ValueError(f"mixing kind must be one of {KINDS}, not {kind!r}")
    gh, gw = (int(s) for s in grid_hw)
    H, W = x.shape[-2:]
    if H % gh or W % gw:
        raise ValueError(f"image {H}x{W} is not a whole number of patches of the {gh}x{gw} token grid")
    ph, pw = H // gh, W // gw
    if kind == "none":
        return Mixed(x, 1.0, torch.ones(gh * gw, device=x.device), None, "none")
    if kind in ("mixup_cutmix", "mixup_cutmix_patch"):
        use_cutmix = float(torch.rand((), generator=generator)) < switch_prob
        box_kind = "cutmix" if kind == "mixup_cutmix" else "cutmix_patch"
        kind, alpha = (box_kind, alpha) if use_cutmix else ("mixup", mixup_alpha)
    if alpha <= 0:
        raise ValueError(f"{kind} needs alpha > 0, got {alpha}")

    if kind == "mixup":
        lam = _beta(generator, alpha)
        images = lam * x + (1.0 - lam) * x.flip(0)
        return Mixed(images, lam, torch.full((gh * gw,), lam, device=x.device), None, kind)

    box = None
    if kind == "cutmix":
        # CutMix geometry (side ratio sqrt(1 - lam), uniform centre, clipped) drawn on the pixel grid:
        # sample_token_box is that sampler on any grid, here one "token" per pixel.
        box, _ = sample_token_box((H, W), generator, alpha, sampler)
        own_px = ~_box_mask((H, W), box, x.device)
    elif kind == "cutmix_patch":
        # The same sampler on the token grid, then scaled to pixels: the box covers whole patches only.
        (y0, y1, x0, x1), _ = sample_token_box((gh, gw), generator, alpha, sampler)
        box = (y0 * ph, y1 * ph, x0 * pw, x1 * pw)
        own_px = ~_box_mask((H, W), box, x.device)
    else:
        swap = _random_patches(gh, gw, generator, alpha, sampler) if kind == "patch" else \
            _block_patches(gh, gw, generator, alpha, block_min_patches)
        own_px = (~swap).repeat_interleave(ph, 0).repeat_interleave(pw, 1).to(x.device)

    images = torch.where(own_px, x, x.flip(0))  # [H, W] mask broadcasts over [B, 3, H, W]; x is not modified
    # A token's own share = mean of its patch's pixels; the shares average to the exact lam.
    token_own = F.avg_pool2d(own_px[None, None].float(), (ph, pw)).flatten()
    lam = 1.0 - int((~own_px).sum()) / (H * W)  # exact, in double precision
    return Mixed(images, lam, token_own, box, kind)


def _box_mask(hw: Tuple[int, int], box: Tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """Boolean [H, W] mask, True inside the half-open box (y0, y1, x0, x1)."""
    mask = torch.zeros(hw, dtype=torch.bool, device=device)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def _random_patches(gh: int, gw: int, generator: torch.Generator, alpha: float, sampler: str = "authors") -> torch.Tensor:
    """[Gh, Gw] bool, True on int((1 - lam) * N) patches chosen uniformly (MAE-style random masking).

    The count is truncated as TL-Align's random token mixing does (sampler="authors"), or rounded ("rounded").
    """
    n = gh * gw
    share = (1.0 - _beta(generator, alpha)) * n
    k = int(share) if sampler == "authors" else round(share)
    swap = torch.zeros(n, dtype=torch.bool)
    swap[torch.randperm(n, generator=generator)[:k]] = True
    return swap.view(gh, gw)


def _block_patches(
        gh: int,
        gw: int,
        generator: torch.Generator,
        alpha: float,
        min_patches: int = 4,
        min_aspect: float = 0.3,
        attempts: int = 10,
) -> torch.Tensor:
    """[Gh, Gw] bool, True on up to round((1 - lam) * N) patches grown as random rectangles (BEiT, Sec. 2.5).

    BEiT's blockwise masking: repeatedly pick a rectangle of area ~ U(min_patches, still needed) and
    aspect ratio log-uniform in [min_aspect, 1 / min_aspect] at a uniform position, and keep it when it
    adds at least one and at most the still-needed number of new patches; stop when the target is met
    or `attempts` rectangles in a row were rejected (the count may then fall short; the caller's lam
    is computed from the mask, so it stays exact).
    """
    target = round((1.0 - _beta(generator, alpha)) * gh * gw)
    swap = torch.zeros(gh, gw, dtype=torch.bool)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    count = 0
    while count < target:
        needed, added = target - count, 0
        for _ in range(attempts):
            area = uniform(min_patches, needed)
            aspect = math.exp(uniform(math.log(min_aspect), -math.log(min_aspect)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < gh and 0 < w < gw):  # BEiT keeps blocks strictly smaller than the grid
                continue
            top = int(torch.randint(0, gh - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (1,), generator=generator))
            new = h * w - int(swap[top:top + h, left:left + w].sum())
            if 0 < new <= needed:
                swap[top:top + h, left:left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return swap


def mix_targets(y: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * y + (1 - lam) * y.flip(0); y [B, C] distributions (CutMix/MixUp target, TL-Align Eq. 1)."""
    return lam * y + (1.0 - lam) * y.flip(0)


def mix_token_targets(t: torch.Tensor, token_own: torch.Tensor) -> torch.Tensor:
    """token_own * t + (1 - token_own) * t.flip(0): token labels [B, N, C] of an image-mixed batch.

    token_own [N] (one mask per batch) or [B, N]. For token labeling with image-level CutMix (LV-ViT
    Table 6): token i of the mixed image shows the partner's content at the same position wherever
    it lies inside the box, so its label is the partner's token-i label in proportion.
    """
    own = token_own.to(t.dtype)
    own = own[None, :, None] if own.ndim == 1 else own[..., None]
    return own * t + (1.0 - own) * t.flip(0)
