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
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF


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


class LabelMaps(NamedTuple):
    """Class probabilities of every map location, kept as the stored top-k rather than dense [B, C, h, w].

    The probability of class c at a location is `rest` plus the sum of `probs[j]` over the j with
    `classes[j] == c`. `rest` [B, 1, h, w] is what every class gets (the leak of zero-logit absent
    classes, `tlvit.labels.score_maps.topk_label_maps`); None means 0.
    """

    probs: torch.Tensor  # [B, k, h, w]
    classes: torch.Tensor  # [B, k, h, w] int64
    num_classes: int
    rest: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, maps: torch.Tensor) -> "LabelMaps":
        """Dense maps [B, C, h, w] as k = C entries (no memory saved: for small C, tests and figures)."""
        B, C, h, w = maps.shape
        return cls(maps, torch.arange(C, device=maps.device).view(1, C, 1, 1).expand(B, C, h, w), C)


def resample_label_maps(
    maps: torch.Tensor | LabelMaps, theta: torch.Tensor, out_hw: tuple[int, int], samples_per_cell: int = 4,
    clips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label distributions of the augmented image: per output cell and pooled over the whole image.

    maps: class probabilities over the original image, `LabelMaps` or dense [B, C, h, w]; theta: [B, 2, 3].
    clips: [B, K, 2, 3] maps from the output to each intermediate image of the augmentation chain
    (e.g. the crop before RandAugment translated it): a point outside any of them shows fill colour
    in the image, so it carries no label either, even where the original image exists.
    Returns (cells [B, C, Gh, Gw], pooled [B, C]). Each output cell averages samples_per_cell^2
    point samples (roi_align's average pooling, generalised to any affine): its label is the mix of
    the map cells it covers, weighted by area. Samples that fall
    outside the original image carry no label; a cell with none left gets a uniform distribution.

    Sampling is nearest, so each sample reads one stored location: its k (class, probability) pairs
    are added into its cell's [C] row. Nothing of size C x samples (or C x h x w) is ever built:
    the largest tensor is the output, [B, C, Gh, Gw] (100 MB at ImageNet scale, batch 128), written once.
    """
    if isinstance(maps, torch.Tensor):
        maps = LabelMaps.from_dense(maps)
    probs, classes, C, rest = maps
    B, k, h, w = probs.shape
    Gh, Gw = out_hw
    s = samples_per_cell
    dev = probs.device
    # Geometry in float32 at least, whatever the probabilities' dtype: location numbers must be exact
    # integers (bfloat16 holds them only up to 256, fewer than a 18x18 map has) and the sample grid exact too.
    gdtype = torch.promote_types(probs.dtype, torch.float32)
    grid = F.affine_grid(theta.to(gdtype), [B, 1, Gh * s, Gw * s], align_corners=False)
    # Which stored location each sample reads, 0 = outside the image: grid_sample's own nearest rounding
    # applied to location numbers, so it is exactly the location that sampling dense maps reads.
    numbers = torch.arange(1, h * w + 1, dtype=gdtype, device=dev).view(1, 1, h, w).expand(B, 1, h, w)
    loc = F.grid_sample(numbers, grid, mode="nearest", padding_mode="zeros", align_corners=False).flatten(1).long()
    weight = (loc > 0).to(probs.dtype)  # [B, P]
    if clips is not None:
        weight *= clip_mask(clips.to(gdtype), grid.shape[1:3]).flatten(1).to(probs.dtype)
    loc = loc.sub_(1).clamp_min_(0)
    P = loc.shape[1]
    cell_of = (torch.arange(Gh * s, device=dev)[:, None] // s * Gw + torch.arange(Gw * s, device=dev) // s).flatten()

    def per_cell(x):  # [B, P] -> [B, Gh * Gw] means over each cell's samples
        return F.avg_pool2d(x.view(B, 1, Gh * s, Gw * s), s).flatten(1)

    cell_inside = per_cell(weight)
    scale = 1 / cell_inside.clamp_min(_EPS)  # normalise while adding: the output is written only once
    # pooled: each stored location counts as often as samples read it ([B, k, h * w] work, not [B, k, P])
    reads = weight.new_zeros(B, h * w).scatter_add_(1, loc, weight)
    pooled_mass = probs.new_zeros(B, C).scatter_add_(1, classes.flatten(1), (probs.flatten(2) * reads[:, None]).flatten(1))
    start = torch.zeros_like(cell_inside)
    if rest is not None:
        pooled_mass += (rest.flatten(1) * reads).sum(1, keepdim=True)
        start = per_cell(rest.flatten(1).gather(1, loc) * weight) * scale
    pooled = _normalise(pooled_mass / P, weight.mean(1, keepdim=True), C)
    # cells class-last [B, Gh * Gw, C] (the token targets [B, N, C] are then a view): each starts from what
    # every class gets (uniform where nothing of the image is inside), then each sample adds its k pairs
    cells = torch.where(cell_inside > _EPS, start, 1.0 / C)[..., None].expand(B, Gh * Gw, C).contiguous()
    at = loc[:, None].expand(B, k, -1)
    share = weight * scale[:, cell_of] / s**2  # [B, P]: each sample's share of its cell
    # in place: fewer fresh [B, k, P] buffers, each a round of page faults on the CPU
    slot = classes.flatten(2).gather(2, at).add_(cell_of * C)  # where in the flat [Gh * Gw * C] row
    cells.view(B, -1).scatter_add_(1, slot.flatten(1), probs.flatten(2).gather(2, at).mul_(share[:, None]).flatten(1))
    return cells.view(B, Gh, Gw, C).permute(0, 3, 1, 2), pooled


def clip_mask(clips: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] 1 where output sample points land inside every intermediate image of `clips` [B, K, 2, 3]."""
    ident = torch.eye(2, 3, dtype=clips.dtype, device=clips.device)[None]
    points = F.affine_grid(ident, [1, 1, *hw], align_corners=False)[0]  # [H, W, 2] output coords, as for any sample
    q = torch.einsum("bkij,hwj->bkhwi", clips[..., :2], points).add_(clips[..., 2][:, :, None, None])
    return (q.abs_() <= 1).all(-1).all(1).to(clips.dtype)


def identity_clips(k: int) -> torch.Tensor:
    """[k, 2, 3] identity transforms: no intermediate image clips anything."""
    return torch.eye(2, 3, dtype=torch.float64).expand(k, 2, 3).clone()


_EPS = 1e-6


def _normalise(mass: torch.Tensor, inside: torch.Tensor, num_classes: int) -> torch.Tensor:
    uniform = torch.full_like(mass, 1.0 / num_classes)
    return torch.where(inside > _EPS, mass / inside.clamp_min(_EPS), uniform)


@dataclass
class WholeImageGeometry:
    """The whole image resized to size x size (aspect not kept): what an annotator sees for a score map.

    theta is the identity, so the map covers exactly the image and every later crop box lands where it
    should, also for non-square images (the original code centre-crops here: deviation `map_region`).
    """

    size: int
    interpolation: str = "bicubic"  # a torchvision InterpolationMode value

    def __call__(self, img):
        """PIL image -> (resized image, theta [2, 3] = identity, clips [1, 2, 3] = identity)."""
        out = TF.resize(img, [self.size, self.size], TF.InterpolationMode(self.interpolation), antialias=True)
        return out, torch.eye(2, 3), identity_clips(1).float()
