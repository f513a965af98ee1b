"""The detection analogue of TL-Align Table 4 (COCO, Cascade Mask R-CNN): the embedded canvases as an instance set.

Every digit drawn on a canvas is an object: its class (the digit; torchvision's detectors number the classes from 1,
0 being the background, so digit d is label d + 1), its mask (the pixels it owns after the digits drawn later
covered part of it) and its box (the tight box of that mask, as COCO's boxes are of the visible object). A digit that
later ones cover entirely is no object. The instances come from composing the split again
(`tlvit.data.canvases.canvas_instances`), checked against the class maps the data stage stored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tlvit.data.canvases import CanvasSpec, canvas_instances

CANVAS_THINGS = 10  # object classes: the ten digits


class DetectionSet(torch.utils.data.Dataset):
    """Canvases of one split: `[i]` = (image [3, S, S] in [0, 1], {"boxes" [K, 4] xyxy, "labels" [K], "masks"
    [K, S, S] uint8}), the format torchvision's detection models train on and torchmetrics' mAP scores."""

    num_classes = CANVAS_THINGS

    def __init__(self, root: str | Path, split: str, spec: CanvasSpec) -> None:
        self.root, self.split = Path(root), split
        self.paths, self.owners, self.classes = canvas_instances(self.root, spec, split)

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        owner = torch.from_numpy(self.owners[index])
        masks, labels = [], []
        for k, cls in enumerate(self.classes[index], start=1):
            if cls >= 0:
                masks.append(owner == k)
                labels.append(int(cls) + 1)
        masks_t = torch.stack(masks) if masks else torch.zeros((0, *owner.shape), dtype=torch.bool)
        return {"boxes": _mask_boxes(masks_t), "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": masks_t.to(torch.uint8)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = Image.open(self.root / self.split / self.paths[index]).convert("RGB")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return x, self.target(index)


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes [K, 4] (float) that enclose each mask's pixels, edges on pixel borders (x1 = last column + 1):
    torchvision's masks_to_boxes gives the last pixel's index, a box one pixel short of the object."""
    from torchvision.ops import masks_to_boxes

    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
