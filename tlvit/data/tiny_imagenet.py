"""A tiny ImageNet-shaped folder: what a user's first `preset: imagenet` run sees, in seconds on a CPU.

`<root>/train/<wnid>/<wnid>_<i>.JPEG` and `<root>/val/<wnid>/...`: WordNet-id class folders, JPEGs of
assorted non-square sizes (landscape and portrait, as ImageNet's), each class a different shape and
colour on a textured background placed anywhere in the image, so that crops and score maps have somewhere
to be wrong. With it, a timm `resnet18` checkpoint for the annotator (`annotator.checkpoint`; weights made
here, seeded, the classifier sized to the folder's classes): the annotator path of a real run, with no
download. The `tiny-imagenet` preset of params.yaml runs the `imagenet` recipe on it (CI does, end to end).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668")
SIZES = ((96, 72), (72, 96), (120, 80), (80, 112), (100, 100), (128, 72))  # (width, height)


def _image(class_id: int, rng: np.random.Generator) -> Image.Image:
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    noise = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in np.array([(class_id * 97) % 256, (class_id * 53 + 80) % 256, (class_id * 151 + 40) % 256]))
    side = int(min(w, h) * rng.uniform(0.35, 0.6))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    if class_id % 3 == 0:
        draw.ellipse(box, fill=colour)
    elif class_id % 3 == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return img


def write_tiny_imagenet(root: str | Path, classes: int = 5, train_per_class: int = 8, val_per_class: int = 4,
                        seed: int = 0) -> Path:
    """Write the folder (train and val, same classes) and return its root; the same seed gives the same bytes."""
    if not 2 <= classes <= len(WNIDS):
        raise ValueError(f"classes must be 2..{len(WNIDS)}, not {classes}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS[:classes]):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(c, rng).save(folder / f"{wnid}_{split}_{i}.JPEG", quality=90)
    return root


def write_annotator_checkpoint(path: str | Path, num_classes: int, model: str = "resnet18", seed: int = 0) -> Path:
    """A timm state dict for `annotator.model: resnet18` with `num_classes` outputs (seeded random weights)."""
    import timm
    import torch

    from tlvit.io import save_torch_atomic

    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False, num_classes=num_classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(net.state_dict(), path)
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("tiny-imagenet", help="write a tiny ImageNet-shaped folder and a resnet18 annotator checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="data/tiny-imagenet-source",
                   help="folder to write (default: the tiny-imagenet preset's data.root)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--train-per-class", type=int, default=8)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    root = write_tiny_imagenet(args.root, args.classes, args.train_per_class, args.val_per_class, args.seed)
    ckpt = write_annotator_checkpoint(root / "annotator-resnet18.pth", args.classes, seed=args.seed)
    print(f"{root}: {args.classes} classes, {args.train_per_class} train / {args.val_per_class} val images each; "
          f"annotator weights {ckpt}")
    return 0
