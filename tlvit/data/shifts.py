"""The shifted test sets' builders (TL-Align Table 6's embedded analogues): ImageNet-C's corruption functions,
seeded per image, and the outline rendition. The data stage writes them; `tlvit.robustness` measures on them."""
from __future__ import annotations

import numpy as np

# ImageNet-C's 15 corruptions (Hendrycks & Dietterich, ICLR 2019), `imagecorruptions`' names, the benchmark's order
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
               "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (H x W uint8 grey, or H x W x 3) corrupted by the benchmark's function -> H x W x 3 uint8; the
    function's random draws come from numpy's global generator, seeded from (seed, name, severity) here."""
    from imagecorruptions import corrupt as _corrupt

    from tlvit.data.datasets import hash_seed

    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    state = np.random.get_state()
    np.random.seed(hash_seed(seed, CORRUPTIONS.index(name), severity) % 2 ** 32)  # legacy seeding takes 32 bits
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
