"""Segmentation sets: (RGB image, per-pixel class map) pairs, with mmsegmentation's training geometry.

- `canvases` (embedded): the data stage's canvases and their ground-truth maps (gt_maps_<split>.npz): classes 0-9
  are the digits, class 10 the background (the maps' 255), 11 classes in all.
- `ade20k` (ImageNet presets): ADEChallengeData2016 from a local folder (images/{training,validation}/*.jpg,
  annotations/{training,validation}/*.png); its 150 classes are the map's 1-150 and 0 ("other") is not scored
  (mmsegmentation's reduce_zero_label: 0 -> 255, k -> k - 1).

Training samples follow mmsegmentation's ADE20K pipeline: the image rescaled (aspect kept) to fit `scale` times a
ratio drawn from `ratio_range`, a random `crop_size` crop (padded with label 255 where the image is smaller), a
horizontal flip with probability `hflip`, and, where `photometric`, torchvision's ColorJitter in place of
mmsegmentation's PhotoMetricDistortion. Every random draw comes from the sample's own generator (seeded by the
run's seed, the iteration and the slot in the batch), so a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ADE20K_CLASSES = 150
CANVAS_CLASSES = 11  # digits 0-9 and the background
IGNORE_INDEX = 255  # pixels scored by nothing: ADE20K's "other", the padding of a random crop


class SegmentationSetError(ValueError):
    """A segmentation set that is not on disk as expected (the message names the folder and the fix)."""


@dataclass(frozen=True)
class Geometry:
    """Training-sample geometry (params `segmentation.augment`)."""

    crop_size: int
    scale: tuple[int, int]  # (long side, short side) the image is fitted into before the ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = False


def fit_scale(height: int, width: int, scale: tuple[int, int]) -> float:
    """The factor that fits an image into (long, short) with its aspect kept (mmcv's rescale_size)."""
    long, short = max(scale), min(scale)
    return min(long / max(height, width), short / min(height, width))


class SegmentationSet(torch.utils.data.Dataset):
    """Images and maps of one split; `item(index, generator)` gives a training sample, `[index]` the whole image."""

    def __init__(self, kind: str, root: str | Path, split: str, mean, std) -> None:
        self.kind, self.root, self.split = kind, Path(root), split
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        if kind == "canvases":
            from tlvit.data.canvases import load_gt_maps

            paths, maps, _ = load_gt_maps(self.root, split)
            self.images = [self.root / split / p for p in paths]
            self.maps = np.where(maps == 255, CANVAS_CLASSES - 1, maps).astype(np.uint8)
            self.num_classes = CANVAS_CLASSES
        elif kind == "ade20k":
            folder = {"train": "training", "val": "validation"}[split]
            images = sorted((self.root / "images" / folder).glob("*.jpg"))
            if not images:
                raise SegmentationSetError(f"{self.root / 'images' / folder}: no ADE20K images; set params.yaml "
                                           "segmentation.source to the ADEChallengeData2016 folder")
            self.images = images
            self.annotations = [self.root / "annotations" / folder / f"{p.stem}.png" for p in images]
            missing = [a for a in self.annotations if not a.is_file()]
            if missing:
                raise SegmentationSetError(f"{missing[0]}: missing annotation ({len(missing)} in all); ADE20K's "
                                           "annotations/ folder must hold one PNG per image")
            self.maps = None
            self.num_classes = ADE20K_CLASSES
        else:
            raise SegmentationSetError(f"segmentation dataset {kind!r}: use `canvases` or `ade20k`")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its class map (uint8, IGNORE_INDEX where nothing is scored)."""
        image = Image.open(self.images[index]).convert("RGB")
        if self.maps is not None:
            return image, self.maps[index]
        raw = np.asarray(Image.open(self.annotations[index]), dtype=np.int64)
        return image, np.where(raw == 0, IGNORE_INDEX, raw - 1).astype(np.uint8)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.load(index)
        return self.normalise(image), torch.from_numpy(target.astype(np.int64))

    def sample(self, index: int, geometry: Geometry, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training sample: rescaled by a random ratio, randomly cropped (padded), flipped, (colour-jittered)."""
        image, target = self.load(index)
        w, h = image.size
        factor = fit_scale(h, w, geometry.scale) * rng.uniform(*geometry.ratio_range)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        image = image.resize(size, Image.BILINEAR)
        label = Image.fromarray(target).resize(size, Image.NEAREST)
        if geometry.photometric:
            from torchvision.transforms import ColorJitter

            torch_gen_seed = int(rng.integers(2**31))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch_gen_seed)
                image = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)(image)
        x = self.normalise(image)
        y = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
        crop = geometry.crop_size
        pad_h, pad_w = max(0, crop - y.shape[0]), max(0, crop - y.shape[1])
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(rng.integers(0, y.shape[0] - crop + 1))
        left = int(rng.integers(0, y.shape[1] - crop + 1))
        x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
        if rng.uniform() < geometry.hflip:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()
