"""Where an augmented image's pixels came from, and the label maps that follow them.

Every geometric augmentation of the image is carried as one affine matrix `theta` [2, 3] that maps
the augmented image's normalised coordinates (x, y in [-1, 1], `align_corners=False` convention:
-1 and +1 are the outer pixel *edges*) to the original image's normalised coordinates. A score map
covers exactly the original image (the annotator saw the whole image, resized), so resampling the
map with `theta` gives the labels of the augmented image, whatever the crop/flip/rotation and for
non-square images too. This is the only place label maps are cropped: ReLabel's pooled label and
token labeling's S x S grid both come from `resample_label_maps`.

The original code builds the crop box as (top, left, bottom, right) for `roi_align`, which expects
(x1, y1, x2, y2), and crops a centre-square map with full-image fractions: both are impossible here
because the box never leaves this matrix form (tests/test_geometry.py checks both).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_flip_theta(box: tuple[float, float, float, float], image_hw: tuple[int, int], hflip: bool) -> torch.Tensor:
    """theta [2, 3] of a resized crop (box = top, left, height, width in source pixels) then an optional flip."""
    top, left, height, width = box
    H, W = image_hw
    sx = width / W
    sy = height / H
    tx = (2 * left + width) / W - 1
    ty = (2 * top + height) / H - 1
    if hflip:  # output x -> -x before the crop's mapping
        sx = -sx
    return torch.tensor([[sx, 0.0, tx], [0.0, sy, ty]], dtype=torch.float64)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """theta of applying `outer`'s transform *after* `inner`'s: out coords -> inner's output -> source.

    `inner` maps its output to the source; `outer` maps the final output to `inner`'s output.
    """
    a = torch.cat([outer, outer.new_tensor([[0, 0, 1]])], 0)
    b = torch.cat([inner, inner.new_tensor([[0, 0, 1]])], 0)
    return (b @ a)[:2]


def rotation_theta(degrees: float, aspect_hw: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """theta of rotating the image content by `degrees` counter-clockwise about its centre."""
    H, W = aspect_hw
    r = math.radians(degrees)
    c, s = math.cos(r), math.sin(r)
    # rotate in pixel units (so non-square images rotate rigidly), expressed in normalised coords
    return torch.tensor([[c, -s * H / W, 0.0], [s * W / H, c, 0.0]], dtype=torch.float64)


def resample_label_maps(
    maps: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int], samples_per_cell: int = 4,
    clips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label distributions of the augmented image: per output cell and pooled over the whole image.

    maps: [B, C, h, w] class probabilities over the original image; theta: [B, 2, 3].
    clips: [B, K, 2, 3] maps from the output to each intermediate image of the augmentation chain
    (e.g. the crop before RandAugment translated it): a point outside any of them shows fill colour
    in the image, so it carries no label either, even where the original image exists.
    Returns (cells [B, C, Gh, Gw], pooled [B, C]). Each output cell averages samples_per_cell^2
    point samples (roi_align's average pooling, generalised to any affine): its label is the mix of
    the map cells it covers, weighted by area. Samples that fall
    outside the original image carry no label; a cell with none left gets a uniform distribution.
    """
    B, C = maps.shape[:2]
    Gh, Gw = out_hw
    s = samples_per_cell
    grid = F.affine_grid(theta.to(maps.dtype), [B, C, Gh * s, Gw * s], align_corners=False)
    # nearest: a stored location labels its whole cell, so supersampling gives area-weighted mixes
    sampled = F.grid_sample(maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(maps[:, :1]), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if clips is not None:
        inside = inside * clip_mask(clips.to(maps.dtype), grid.shape[1:3])[:, None]
    cell_mass = F.avg_pool2d(sampled, s)
    cell_inside = F.avg_pool2d(inside, s)
    cells = _normalise(cell_mass, cell_inside, C)
    pooled = _normalise(sampled.mean((2, 3)), inside.mean((2, 3)), C)
    return cells, pooled


def clip_mask(clips: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] 1 where output sample points land inside every intermediate image of `clips` [B, K, 2, 3]."""
    B, K = clips.shape[:2]
    ident = torch.eye(2, 3, dtype=clips.dtype, device=clips.device).expand(B, 2, 3)
    points = F.affine_grid(ident, [B, 1, *hw], align_corners=False)  # [B, H, W, 2] output coords
    q = torch.einsum("bkij,bhwj->bkhwi", clips[..., :2], points) + clips[..., 2][:, :, None, None]
    return (q.abs() <= 1).all(-1).all(1).to(clips.dtype)


def identity_clips(k: int) -> torch.Tensor:
    """[k, 2, 3] identity transforms: no intermediate image clips anything."""
    return torch.eye(2, 3, dtype=torch.float64).expand(k, 2, 3).clone()


def _normalise(mass: torch.Tensor, inside: torch.Tensor, num_classes: int) -> torch.Tensor:
    eps = 1e-6
    uniform = torch.full_like(mass, 1.0 / num_classes)
    return torch.where(inside > eps, mass / inside.clamp_min(eps), uniform)
