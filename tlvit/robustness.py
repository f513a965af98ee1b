"""Robustness and generalisation as TL-Align Table 6 measures them (Xiao et al., "Token-Label Alignment for Vision
Transformers", ICCV 2023, arXiv:2210.06455): top-1 on ImageNet-V2, -A and -R, ImageNet-C's mean corruption error
(mCE) and accuracy under AutoAttack, plus what the embedded analogues of those sets are built from.

- mCE (Hendrycks & Dietterich, ICLR 2019): per corruption, the model's top-1 error summed over the 5 severities
  divided by AlexNet's, averaged over the 15 corruptions. AlexNet's errors (mean over severities) are the
  benchmark's published constants. Without a reference (the embedded data: no AlexNet there) the mean error itself
  is reported, under its own name.
- ImageNet-A and -R cover 200 of the 1,000 classes: as their authors evaluate, the prediction is the arg-max over
  those classes. ImageNet-V2's folders are class indices ("0".."999"), the others' WordNet ids.
- AutoAttack: the standard version (APGD-CE, APGD-T, FAB-T, Square; L-inf, eps 4/255 on [0, 1] pixels as for
  ImageNet) from `torchattacks`, on the model with its input normalisation folded in.
- The corruption functions are the benchmark's own (`imagecorruptions`, the maintained fork); the rendition shift of
  the embedded data draws each digit as its outline.
"""
from __future__ import annotations

import hashlib
import statistics

import numpy as np
import torch

# AlexNet's top-1 error per corruption, mean over severities 1-5 (Hendrycks & Dietterich's published constants);
# the keys are `imagecorruptions`' names, in the benchmark's order.
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
CORRUPTIONS = tuple(ALEXNET_ERR)
SEVERITIES = (1, 2, 3, 4, 5)
AUTOATTACK_EPS = 4 / 255


def corruption_error(errors: dict[str, dict[int, float]], reference: dict[str, float] | None = ALEXNET_ERR) -> dict:
    """errors[corruption][severity] = top-1 error (%) -> {"mce" or "mean_error": %, "per_corruption": {c: %}}.

    With `reference` (AlexNet's mean errors as fractions): CE_c = sum_s E_c,s / sum_s E^ref_c,s, mCE = mean_c CE_c,
    in %. Without: the mean error over corruptions and severities. Every corruption needs all 5 severities.
    """
    missing = [c for c in CORRUPTIONS if sorted(errors.get(c, {})) != list(SEVERITIES)]
    if missing:
        raise ValueError(f"corruption errors missing for {missing}: each needs severities {list(SEVERITIES)}")
    per = {}
    for c in CORRUPTIONS:
        mean_err = statistics.fmean(errors[c][s] for s in SEVERITIES)  # %
        per[c] = 100.0 * (mean_err / 100.0) / reference[c] if reference else mean_err
    key = "mce" if reference else "mean_error"
    return {key: statistics.fmean(per.values()), "per_corruption": per}


def class_index(split_classes: list[str], train_classes: list[str]) -> list[int]:
    """The model's output index of each class folder of a test set: ImageNet-V2 names its folders by index
    ("0".."999"), ImageNet-A/-R/-C by WordNet id (then the id's position among the train split's folders)."""
    if all(c.isdigit() for c in split_classes):
        idx = [int(c) for c in split_classes]
        bad = [i for i in idx if i >= len(train_classes)]
        if bad:
            raise ValueError(f"class folders {bad[:5]} are beyond the model's {len(train_classes)} classes")
        return idx
    position = {c: i for i, c in enumerate(train_classes)}
    unknown = [c for c in split_classes if c not in position]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} are not classes of the train split (e.g. {train_classes[:2]}); "
                         "is this set for the same dataset?")
    return [position[c] for c in split_classes]


@torch.no_grad()
def top1(logits: torch.Tensor, targets: torch.Tensor, classes: list[int] | None = None) -> float:
    """Top-1 (%) of `logits` [N, C] against `targets` (model indices); with `classes` the arg-max runs over those
    output indices only (ImageNet-A/-R's 200 classes)."""
    if classes is not None and len(classes) < logits.shape[1]:
        masked = torch.full_like(logits, float("-inf"))
        idx = torch.as_tensor(classes)
        masked[:, idx] = logits[:, idx]
        logits = masked
    return 100.0 * (logits.argmax(1) == targets).float().mean().item()


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (H x W uint8 grey, or H x W x 3) corrupted by the benchmark's function -> H x W x 3 uint8; the
    function's random draws come from numpy's global generator, seeded from (seed, name, severity) here."""
    from imagecorruptions import corrupt as _corrupt

    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    state = np.random.get_state()
    np.random.seed(_seed(seed, name, severity))
    try:
        out = _corrupt(rgb, corruption_name=name, severity=severity)
    finally:
        np.random.set_state(state)
    return np.asarray(out, dtype=np.uint8)[: rgb.shape[0], : rgb.shape[1]]


def outline(canvas: np.ndarray) -> np.ndarray:
    """The rendition shift of the embedded data: each digit drawn as its outline (grey-level morphological gradient,
    3x3), rescaled to the canvas's range. Same size and dtype."""
    from scipy import ndimage

    x = canvas.astype(np.float32)
    edge = ndimage.grey_dilation(x, size=(3, 3)) - ndimage.grey_erosion(x, size=(3, 3))
    top = float(x.max()) or 1.0
    edge *= top / (float(edge.max()) or 1.0)
    return edge.astype(canvas.dtype) if np.issubdtype(canvas.dtype, np.floating) else edge.round().astype(canvas.dtype)


class Normalised(torch.nn.Module):
    """A classifier on [0, 1] pixels: the model with its input normalisation folded in (what attacks perturb)."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model((x - self.mean) / self.std)
        return out[0] if isinstance(out, tuple) else out


def autoattack_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        eps: float = AUTOATTACK_EPS, seed: int = 0, batch_size: int = 64) -> dict:
    """Accuracy (%) of `model` (on [0, 1] pixels, e.g. `Normalised`) on `images` before and after the standard
    AutoAttack (L-inf, `eps`); every adversarial image stays within eps of its original and in [0, 1]."""
    import torchattacks

    model = model.eval()
    n_classes = int(model(images[:1]).shape[1])
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    clean = robust = 0
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        with torch.no_grad():
            clean += int((model(x).argmax(1) == y).sum())
        adv = attack(x, y)
        if (adv - x).abs().max() > eps + 1e-6 or adv.min() < 0 or adv.max() > 1:
            raise RuntimeError("AutoAttack returned images outside the L-inf ball or [0, 1]")
        with torch.no_grad():
            robust += int((model(adv).argmax(1) == y).sum())
    n = len(images)
    return {"images": n, "clean_top1": 100.0 * clean / n, "autoattack_top1": 100.0 * robust / n, "eps": eps}
