"""The downstream classification sets of TL-Align's Table 5 (transfer learning), as ImageFolder splits.

ImageNet presets read CIFAR-10/100, Flowers-102 and Stanford Cars with torchvision's dataset classes from local
folders (nothing is downloaded) and write each once as `train/` and `val/` class folders of PNGs, the layout every
tlvit loader reads. The embedded presets use scikit-learn's bundled handwritten digits (`load_digits`: 1,797 8x8
images of 10 classes, written by other people than MNIST's, at another resolution): a task the canvas-trained
backbones never saw, each digit upscaled and centred on a black canvas like the embedded ones.

Writes are atomic (a temporary folder renamed when complete): an interrupted export leaves nothing half-written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

__all__ = ["TASKS", "EMBEDDED_TASKS", "prepare_task"]

# task -> (torchvision class name, its keyword for the training split and for the evaluation split)
TORCHVISION_TASKS = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}),
    "flowers": ("Flowers102", {"split": "train"}, {"split": "test"}),
    "cars": ("StanfordCars", {"split": "train"}, {"split": "test"}),
}
EMBEDDED_TASKS = ("digits",)
TASKS = EMBEDDED_TASKS + tuple(TORCHVISION_TASKS)


def prepare_task(task: str, out_root: Path, sources: dict | None = None, canvas_size: int = 64) -> Path | None:
    """The task's ImageFolder root under `out_root` (written on first use), or None when its source is not on disk.

    sources: task -> the local folder torchvision's class reads (ImageNet presets); unused for `digits`."""
    if task not in TASKS:
        raise ValueError(f"transfer task {task!r}: use one of {TASKS}")
    root = Path(out_root) / task
    if (root / "val").is_dir() and (root / "train").is_dir():
        return root
    if task in EMBEDDED_TASKS:
        return _atomic(root, lambda tmp: _write_digits(tmp, canvas_size))
    source = (sources or {}).get(task)
    if not source or not Path(source).is_dir():
        return None
    return _atomic(root, lambda tmp: _write_torchvision(tmp, task, Path(source)))


def _atomic(root: Path, write) -> Path:
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.rename(root)
    return root


def _write_digits(out: Path, canvas_size: int, val_share: float = 0.3, seed: int = 0) -> None:
    """scikit-learn's digits, 16 grey levels, upscaled (bilinear) to 5/8 of the canvas and centred; a stratified split
    (`val_share` of each class, fixed seed)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=val_share, stratify=digits.target,
                                          random_state=seed)
    side = canvas_size * 5 // 8
    offset = (canvas_size - side) // 2
    for split, idx in (("train", idx_train), ("val", idx_val)):
        for i in idx:
            digit = Image.fromarray(images[i]).resize((side, side), Image.BILINEAR)
            canvas = Image.new("L", (canvas_size, canvas_size))
            canvas.paste(digit, (offset, offset))
            folder = out / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            canvas.convert("RGB").save(folder / f"{i:04d}.png")


def _write_torchvision(out: Path, task: str, source: Path) -> None:
    """One torchvision dataset's two splits as class folders of PNGs (class index folders, zero-padded)."""
    import torchvision.datasets as tvd

    name, train_kw, val_kw = TORCHVISION_TASKS[task]
    cls = getattr(tvd, name)
    for split, kw in (("train", train_kw), ("val", val_kw)):
        try:
            ds = cls(str(source), download=False, **kw)
        except (RuntimeError, FileNotFoundError) as e:
            raise FileNotFoundError(f"{source}: torchvision's {name} cannot read it ({e}); point "
                                    f"transfer.sources.{task} at the folder {name} expects") from None
        for i in range(len(ds)):
            img, label = ds[i]
            folder = out / split / f"{int(label):04d}"
            folder.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(folder / f"{i:06d}.png")
