"""timm's RandAugment, with its geometric ops (rotate, shear, translate) recorded for the label maps.

Ops are chosen and their magnitudes sampled exactly as `timm.data.auto_augment.RandAugment` does
(same op table, same level functions, same PIL calls). For the geometric ones we also compute the
affine they apply and compose it into the sample's `theta`, so the score map follows the pixels
(LV-ViT Sec. 4.2: "we need to make corresponding changes in the dense score map"). Colour ops and
random erasing leave the labels alone.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import _LEVEL_DENOM, AugmentOp, RandAugment, rand_augment_transform

from tlvit.labels.geometry import compose, identity_clips

GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


def build_rand_augment(config: str, img_size: int, mean: tuple[float, ...]) -> "LabelAwareRandAugment":
    """From a timm config string such as 'rand-m9-mstd0.5-inc1' (the LV-ViT recipe)."""
    hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    return LabelAwareRandAugment(rand_augment_transform(config, hparams))


def _magnitude(op: AugmentOp) -> float:
    """The magnitude timm's AugmentOp.__call__ would use (same random draws, same order)."""
    m = op.magnitude
    if op.magnitude_std == float("inf"):
        m = random.uniform(0, m)
    elif op.magnitude_std > 0:
        m = random.gauss(m, op.magnitude_std)
    return max(0.0, min(m, op.magnitude_max or _LEVEL_DENOM))


def pixel_affine(name: str, args: tuple, size: tuple[int, int]) -> np.ndarray:
    """3x3 matrix PIL applies for op `name`: output pixel coords -> input pixel coords (x, y, 1)."""
    W, H = size
    if name == "ShearX":
        return np.array([[1, args[0], 0], [0, 1, 0], [0, 0, 1]], float)
    if name == "ShearY":
        return np.array([[1, 0, 0], [args[0], 1, 0], [0, 0, 1]], float)
    if name in ("TranslateX", "TranslateXRel"):
        px = args[0] * W if name.endswith("Rel") else args[0]
        return np.array([[1, 0, px], [0, 1, 0], [0, 0, 1]], float)
    if name in ("TranslateY", "TranslateYRel"):
        px = args[0] * H if name.endswith("Rel") else args[0]
        return np.array([[1, 0, 0], [0, 1, px], [0, 0, 1]], float)
    if name == "Rotate":  # PIL rotates counter-clockwise about the centre (y points down)
        a = math.radians(args[0])
        c, s = math.cos(a), math.sin(a)
        cx, cy = W / 2, H / 2
        r = np.array([[c, -s], [s, c]])
        t = np.array([cx, cy]) - r @ np.array([cx, cy])
        return np.array([[r[0, 0], r[0, 1], t[0]], [r[1, 0], r[1, 1], t[1]], [0, 0, 1]], float)
    raise ValueError(f"not a geometric op: {name}")


def to_normalised(matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A pixel-coordinate affine as theta [2, 3] in normalised coordinates (align_corners=False)."""
    W, H = size
    n = np.array([[2 / W, 0, -1], [0, 2 / H, -1], [0, 0, 1]])
    return torch.from_numpy((n @ matrix @ np.linalg.inv(n))[:2])


class LabelAwareRandAugment:
    """img -> (augmented img, theta [2, 3], clips [num_layers, 2, 3]).

    theta maps the augmented image's normalised coords to the input's; clips map them to the input of
    each geometric op (identity where an op was colour-only or skipped): where a point falls outside
    one, the op filled it with the fill colour, so it carries no label.
    """

    def __init__(self, ra: RandAugment):
        self.ra = ra
        self.num_layers = ra.num_layers

    def __call__(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
        clips = identity_clips(self.num_layers)
        ops = np.random.choice(self.ra.ops, self.ra.num_layers, replace=self.ra.choice_weights is None,
                               p=self.ra.choice_weights)
        for op in ops:  # timm's AugmentOp.__call__, step by step, so the geometric ops' arguments are known
            if op.prob < 1.0 and random.random() > op.prob:
                continue
            args = op.level_fn(_magnitude(op), op.hparams) if op.level_fn is not None else ()
            if op.name.startswith("Posterize") and args[0] < 1:
                # timm's increasing posterize reaches 0 bits at magnitude 10, which Pillow >= 10 rejects
                args = (1,)
            size = img.size
            img = op.aug_fn(img, *args, **op.kwargs)
            if op.name not in GEOMETRIC:
                continue
            step = to_normalised(pixel_affine(op.name, args, size), size)
            # earlier clips now start from this op's output; this op's input becomes a clip of its own
            clips = torch.stack([compose(step, c) for c in clips[1:]] + [step])
            theta = compose(step, theta)
        return img, theta, clips
