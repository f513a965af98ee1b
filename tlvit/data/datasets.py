"""ImageFolder datasets that carry what dense labels need: sample id, crop geometry, score-map top-k.

One code path for the embedded canvases and for ImageNet: `<root>/<split>/<class>/<image>`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from tlvit.labels.geometry import WholeImageGeometry, compose, crop_flip_theta, identity_clips  # noqa: F401  (re-exported)
from tlvit.labels.score_maps import ScoreMapError, ScoreMapStore


def hash_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (sequential seeds would give correlated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


# Normalisation per data kind: embedded canvases are grey digits on black; ImageNet statistics otherwise.
DATA_STATS = {"canvases": ((0.1, 0.1, 0.1), (0.25, 0.25, 0.25)),
              "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class DatasetError(RuntimeError):
    """A dataset folder or image that cannot be used; the message names it and the fix."""


def index_split(root: str | Path, split: str) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, class ids, class names) of `<root>/<split>`, in a stable sorted order."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"{split_dir}: dataset split not found. Expected an ImageFolder `<root>/{split}/<class>/<image>`; "
            "set the preset's `data.root` in params.yaml (or run `dvc repro data` for the embedded default)"
        )
    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise DatasetError(f"{split_dir}: {e}; put each class's images in its own sub-folder") from e
    rel = [str(Path(p).relative_to(split_dir)) for p, _ in samples]
    return rel, [t for _, t in samples], classes


def check_same_classes(split_dir: Path, found: list[str], train: list[str]) -> None:
    """Class ids are positions in train's sorted class list: a split with other folders would shift them."""
    if found != train:
        missing, extra = sorted(set(train) - set(found)), sorted(set(found) - set(train))
        raise DatasetError(f"{split_dir}: class folders differ from the train split's (missing {missing}, extra "
                           f"{extra}); class ids come from train's sorted folders, so every split needs the same ones")


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, naming the file and the fix when it is unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image ({e}); replace or delete the file (embedded data: `dvc repro data`)") from e


# Train-time transform orders (`transform_order`). The authors' loader (TokenLabeling) flips and runs
# RandAugment on the whole image, then takes the random-resized crop; timm's and DeiT's crop first.
TRANSFORM_ORDERS = ("crop_flip_randaug", "flip_randaug_crop")
INTERPOLATIONS = {"bicubic": [InterpolationMode.BICUBIC], "bilinear": [InterpolationMode.BILINEAR],
                  # timm's `--train-interpolation random`: bilinear or bicubic per sample
                  "random": [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC]}


@dataclass
class TrainGeometry:
    """Random-resized crop, horizontal flip, optional RandAugment: the image, and theta for its labels.

    order: `crop_flip_randaug` (timm/DeiT) or `flip_randaug_crop` (the authors' TokenLabeling loader,
    RandAugment on the whole image). color_jitter: timm's ColorJitter strength, used (as timm does)
    only when RandAugment is off; colour changes leave the labels alone.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: InterpolationMode | str = InterpolationMode.BICUBIC  # or a key of INTERPOLATIONS
    rand_augment: Callable | None = None  # LabelAwareRandAugment: img -> (img, theta of its geometric ops)
    order: str = "crop_flip_randaug"
    color_jitter: float | None = None

    def __post_init__(self):
        if self.order not in TRANSFORM_ORDERS:
            raise ValueError(f"transform_order {self.order!r}: use one of {TRANSFORM_ORDERS}")
        modes = INTERPOLATIONS.get(self.interpolation) if isinstance(self.interpolation, str) else [self.interpolation]
        if modes is None:
            raise ValueError(f"train_interpolation {self.interpolation!r}: use one of {sorted(INTERPOLATIONS)}")
        self._modes = modes
        self._jitter = None
        if self.color_jitter and self.rand_augment is None:
            from torchvision.transforms import ColorJitter

            self._jitter = ColorJitter(*(3 * [float(self.color_jitter)]))

    def _mode(self) -> InterpolationMode:
        return self._modes[0] if len(self._modes) == 1 else random.choice(self._modes)

    def _crop(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size], self._mode(), antialias=True)
        return out, crop_flip_theta((top, left, h, w), (img.height, img.width), False)

    def _flip(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        flip = bool(torch.rand(()) < self.hflip)
        theta = crop_flip_theta((0, 0, img.height, img.width), (img.height, img.width), flip)
        return (TF.hflip(img) if flip else img), theta

    def _colour(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        """RandAugment (theta and clips of its geometric ops) or colour jitter (identity) or nothing."""
        if self.rand_augment is not None:
            return self.rand_augment(img)
        if self._jitter is not None:
            img = self._jitter(img)
        return img, identity_clips(1)[0], identity_clips(1)

    def __call__(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        """(image, theta [2, 3], clips [K, 2, 3]); see tlvit.labels.geometry.resample_label_maps."""
        # each theta maps its step's output to its input; composed, the output to the source image
        if self.order == "crop_flip_randaug":
            out, theta = self._crop(img)  # the crop lies inside the image: only RandAugment clips
            out, flip_theta = self._flip(out)
            out, aug_theta, clips = self._colour(out)
            return out, compose(aug_theta, compose(flip_theta, theta)).float(), clips.float()
        img, flip_theta = self._flip(img)
        img, aug_theta, clips = self._colour(img)
        out, crop_theta = self._crop(img)
        clips = torch.stack([compose(crop_theta, c) for c in clips])  # RandAugment's fill regions, seen from the crop
        return out, compose(crop_theta, compose(aug_theta, flip_theta)).float(), clips.float()


@dataclass
class EvalGeometry:
    """Resize (short side to size / crop_pct) and centre-crop; theta records the region kept."""

    size: int
    crop_pct: float = 1.0
    interpolation: InterpolationMode = InterpolationMode.BICUBIC

    def __call__(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        W, H = img.size
        side = min(H, W) * self.crop_pct  # the centre square (in source pixels) that becomes the output
        top, left = (H - side) / 2, (W - side) / 2
        if self.crop_pct >= 1.0 and H == W:
            out = TF.resize(img, [self.size, self.size], self.interpolation, antialias=True)
        else:
            out = TF.resized_crop(img, round(top), round(left), round(side), round(side), [self.size, self.size],
                                  self.interpolation, antialias=True)
        return out, crop_flip_theta((top, left, side, side), (H, W), False).float(), identity_clips(1).float()


class DenseLabelDataset(Dataset):
    """ImageFolder split -> dict(image, label, index, theta[, topk_logits, topk_classes]).

    `score_maps` (optional) is verified against the split's images on construction.
    """

    def __init__(self, root: str | Path, split: str, geometry: Callable, mean: tuple, std: tuple,
                 score_maps: str | Path | None = None, erasing: Callable | None = None,
                 classes: list[str] | None = None):
        self.root = Path(root)
        self.split_dir = self.root / split
        self.paths, self.targets, self.classes = index_split(root, split)
        if classes is not None:
            check_same_classes(self.split_dir, self.classes, list(classes))
        if not self.paths:
            raise DatasetError(f"{self.split_dir}: no images found (extensions {IMG_EXTENSIONS})")
        self.geometry = geometry
        self.mean, self.std = list(mean), list(std)
        self.erasing = erasing  # e.g. timm RandomErasing on the normalised tensor; labels unchanged (as the original)
        self.aug_seed: tuple[int, int] | None = None  # (seed, epoch) once set_epoch is called
        self.store: ScoreMapStore | None = None
        if score_maps is not None:
            self.store = ScoreMapStore(score_maps)
            self.store.verify(self.paths, self.split_dir, num_classes=len(self.classes))

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Make sample i's augmentation a function of (seed, epoch, i) alone.

        Then the data do not depend on the number of processes, loader workers or their order: a DDP
        run sees exactly the samples a single process would, and a resumed run those it would have seen.
        """
        self.aug_seed = (seed, epoch)

    def _seed_sample(self, i: int, view: int) -> None:
        # view 0 keeps the seed a run without repeated augmentation uses
        s = hash_seed(*self.aug_seed, i) if view == 0 else hash_seed(*self.aug_seed, i, view)
        # The CPU generator alone (what the crop and flip draw from): torch.manual_seed also seeds CUDA,
        # and until CUDA is initialised (always, in a loader worker) it queues that call with a formatted
        # stack trace, ~1 ms a sample: measured ~40% of a 64-px canvas's loading time.
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)  # timm's RandAugment draws from numpy and `random`

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        """Sample i, or (i, view): copy `view` of sample i under repeated augmentation, augmented its own way."""
        i, view = i if isinstance(i, tuple) else (i, 0)
        img = load_rgb(self.split_dir / self.paths[i])
        if self.store is not None and list(img.size) != self.store.index["sizes"][i]:
            # the same name, another image (e.g. 300x200 swapped for 200x300): its map would label the wrong pixels
            raise ScoreMapError(f"{self.split_dir / self.paths[i]}: image is {img.size[0]}x{img.size[1]} but the score-map "
                                f"store {self.store.root} was made from a {'x'.join(map(str, self.store.index['sizes'][i]))} "
                                "image of this name; regenerate the store (`dvc repro scoremaps` or `tlvit scoremaps`)")
        if self.aug_seed is not None:
            self._seed_sample(i, view)
        img, theta, clips = self.geometry(img)
        x = TF.normalize(TF.to_tensor(img), self.mean, self.std)
        if self.erasing is not None:
            x = self.erasing(x)
        item = {"image": x, "label": self.targets[i], "index": i, "theta": theta, "clips": clips}
        if self.store is not None:
            logits, classes = self.store.read(i)
            item["topk_logits"] = torch.from_numpy(logits)
            item["topk_classes"] = torch.from_numpy(classes)  # small int type; widened on the device
        return item


def train_split(cfg: dict, root: str | Path, kind: str, score_maps: str | Path | None = None) -> DenseLabelDataset:
    """The `train` split as a run of `cfg` (a resolved training config) sees it.

    Crop geometry, RandAugment and random erasing come from the config here and only here, so that
    training and `tlvit bench data` (which times this loader with and without score maps) cannot drift.
    """
    from timm.data.random_erasing import RandomErasing

    from tlvit.data.rand_augment import build_rand_augment

    mean, std = DATA_STATS[kind]
    rand_augment = build_rand_augment(cfg["rand_augment"], cfg["img_size"], mean) if cfg.get("rand_augment") else None
    # train_interpolation, transform_order, color_jitter: keys of the imagenet preset only (absent: timm's defaults
    # before this harness had them, so the embedded rows' configs and hashes stay as they were)
    geometry = TrainGeometry(cfg["img_size"], tuple(cfg["crop_scale"]), tuple(cfg["crop_ratio"]), cfg["hflip"],
                             cfg.get("train_interpolation", "bicubic"), rand_augment,
                             cfg.get("transform_order", "crop_flip_randaug"), cfg.get("color_jitter"))
    erasing = RandomErasing(cfg["reprob"], mode="pixel", device="cpu") if cfg.get("reprob") else None
    return DenseLabelDataset(root, "train", geometry, mean, std, score_maps=score_maps, erasing=erasing)


def val_split(cfg: dict, root: str | Path, kind: str, classes: list[str] | None = None) -> DenseLabelDataset:
    """The split a run of `cfg` evaluates on (resize + centre crop at `crop_pct`): `val`, or `tune` where the
    preset sets `eval_split: tune` (choosing a recipe without looking at val).

    classes: the train split's class folders, which it must match exactly (training passes them; None: unchecked).
    """
    mean, std = DATA_STATS[kind]
    split = cfg.get("eval_split", "val")
    if split not in ("val", "tune"):
        raise ValueError(f"eval_split {split!r}: use `val` or `tune`")
    return DenseLabelDataset(root, split, EvalGeometry(cfg["img_size"], cfg.get("crop_pct", 1.0)), mean, std,
                             classes=classes)
