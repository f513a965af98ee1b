"""Object detection and instance segmentation on a classification backbone (TL-Align, Table 4's analogue).

The paper's detector is Cascade Mask R-CNN with an FPN on Swin's four stages, a 4-conv + 1-fc box head and GIoU
loss (the Swin authors' mmdetection configs). torchvision, the maintained detector that runs here, has Mask R-CNN and
no cascade; a `Detector` is torchvision's `MaskRCNN` with

- the backbone's four levels (`BackboneFeatures`: a pyramid model's stages, a ViT's blocks through a MultiLevelNeck)
  under torchvision's `FeaturePyramidNetwork` with a max-pooled fifth level, as mmdetection's FPN;
- the 4-conv + 1-fc box head with batch norm (torchvision's `FastRCNNConvFCHead`, the configs' `4conv1f` with
  SyncBN) and the usual 4-conv mask head, all `channels` wide;
- one anchor size per level (`anchor_sizes`), three aspect ratios;
- images taken at the backbone's input size (its position tables are built for it): no resizing beyond that.

The differences from the paper's detector (one stage instead of three, smooth-L1 instead of GIoU box loss) are
documented in docs/recipes.md; the COCO numbers themselves are a cluster recipe with the Swin authors' code.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from tlvit.models.segmenter import BackboneFeatures


class FeaturePyramid(nn.Module):
    """backbone levels -> FPN maps "0".."3" and "pool", `out_channels` each (what torchvision's detectors take)."""

    def __init__(self, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.features = BackboneFeatures(backbone, levels=4, neck_channels=channels)
        self.fpn = FeaturePyramidNetwork(self.features.channels, channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.features(x))))


def _mask_rcnn_class():
    from torchvision.models.detection import MaskRCNN

    class Detector(MaskRCNN):
        @torch.jit.ignore
        def no_weight_decay(self) -> set[str]:
            """The backbone's parameters kept out of weight decay, by their names here (timm's optimizer reads it)."""
            backbone = self.backbone.features.backbone
            names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
            return {f"backbone.features.backbone.{n}" for n in names}

    return Detector


def build_detector(backbone: nn.Module, num_classes: int, image_size: int, *, channels: int = 256,
                   fc_channels: int = 1024, anchor_sizes=(32, 64, 128, 256, 512), rois_per_image: int = 512,
                   proposals: int = 1000, image_mean=(0.485, 0.456, 0.406),
                   image_std=(0.229, 0.224, 0.225)) -> nn.Module:
    """Mask R-CNN on the backbone (classifier removed) for `num_classes` object classes (labels 1..num_classes).
    rois_per_image: RoIs sampled per image for the box head in training; proposals: the RPN's proposals per image kept
    after NMS at inference (mmdetection's and torchvision's 1000; the box head runs on each)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    body = FeaturePyramid(backbone, channels)
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes: one size per FPN level (4 levels and the pooled one), not {anchor_sizes}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc_channels], norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(channels, [channels] * 4, 1)
    Detector = _mask_rcnn_class()
    # num_classes + 1: torchvision's class 0 is the background
    return Detector(body, num_classes=None, min_size=image_size, max_size=image_size, image_mean=list(image_mean),
                    image_std=list(image_std), rpn_anchor_generator=anchors, box_head=box_head,
                    box_predictor=_box_predictor(fc_channels, num_classes + 1), box_batch_size_per_image=rois_per_image,
                    mask_head=mask_head, mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
                    rpn_post_nms_top_n_test=proposals, size_divisible=1)


def _box_predictor(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(in_channels, num_classes)
