"""Semantic segmentation on a classification backbone (LV-ViT slides, Tables 5-6; TL-Align, Table 3).

A `Segmenter` is a trained backbone (any tlvit model: LV-ViT, DeiT, Swin, PVT-v2) plus a decode head:

- `fcn`: torchvision's `FCNHead` (3x3 conv, BN, ReLU, dropout, 1x1 classifier) on the backbone's last features at
  their own stride (a ViT's last block; a pyramid model's last stage);
- `upernet`: segmentation_models_pytorch's `UPerNetDecoder` (PSP pooling on the coarsest level, FPN over the others,
  each level layer-normed first) over four levels at 4, 8, 16 and 32 x the smallest stride, then dropout and a 1x1
  classifier, with an auxiliary FCN head on the third level (loss weight `aux_weight`, training only), as
  mmsegmentation's UperNet configs that the papers' segmentation results come from.

Pyramid models give their four stages (timm's `forward_intermediates`; an embedded analog with three stages gets
its fourth level by 2x max-pooling the third, as mmsegmentation's neck makes its coarsest level). Plain ViTs give
the patch tokens after four evenly spaced blocks (mmsegmentation's ViT `out_indices`, e.g. 2, 5, 8, 11 of 12),
resampled to 4, 2, 1 and 1/2 x the patch grid as mmsegmentation's `MultiLevelNeck` does (1x1 conv, bilinear resize,
3x3 conv) — the neck that its DeiT + UperNet configs put between the two.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("fcn", "upernet")


def vit_block_indices(depth: int) -> list[int]:
    """Four evenly spaced blocks, the last one last: 12 blocks -> [2, 5, 8, 11]; 16 -> [3, 7, 11, 15]."""
    return [max(0, round(depth * (k + 1) / 4) - 1) for k in range(4)]


class BackboneFeatures(nn.Module):
    """NCHW feature maps of a classification backbone: `levels=1` the last features at their own stride; `levels=4`
    four maps, finest first (a ViT's through a MultiLevelNeck)."""

    def __init__(self, backbone: nn.Module, levels: int, neck_channels: int | None = None) -> None:
        super().__init__()
        if levels not in (1, 4):
            raise ValueError(f"levels must be 1 or 4, not {levels}")
        self.backbone, self.levels = backbone, levels
        self.pyramid = hasattr(backbone, "forward_intermediates") and hasattr(backbone, "feature_info")
        if self.pyramid:
            stages = [info["num_chs"] for info in backbone.feature_info]
            self.stages = min(levels, len(stages))
            self.channels = stages[-self.stages:] + stages[-1:] * (levels - self.stages)
            self.neck = None
            return
        dim = backbone.embed_dim
        self.block_indices = vit_block_indices(len(backbone.blocks))[-levels:]
        if levels == 1:
            self.channels, self.neck = [dim], None
            return
        out = neck_channels or dim
        self.channels = [out] * 4
        self.neck = nn.ModuleDict({
            "lateral": nn.ModuleList([nn.Conv2d(dim, out, 1) for _ in range(4)]),
            "convs": nn.ModuleList([nn.Conv2d(out, out, 3, padding=1) for _ in range(4)]),
        })

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.pyramid:
            maps = self.backbone.forward_intermediates(x, indices=self.stages, intermediates_only=True)
            while len(maps) < self.levels:
                maps.append(F.max_pool2d(maps[-1], 2))
            return maps
        maps = self._vit_maps(x)
        if self.neck is None:
            return maps
        out = []
        for i, (m, scale) in enumerate(zip(maps, (4.0, 2.0, 1.0, 0.5))):
            m = self.neck["lateral"][i](m)
            m = F.interpolate(m, scale_factor=scale, mode="bilinear", align_corners=False)
            out.append(self.neck["convs"][i](m))
        return out

    def _vit_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The patch tokens after each chosen block, as [B, C, Gh, Gw] (prefix tokens dropped)."""
        grabbed: dict[int, torch.Tensor] = {}
        hooks = [self.backbone.blocks[i].register_forward_hook(lambda _m, _in, out, i=i: grabbed.__setitem__(i, out))
                 for i in self.block_indices]
        try:
            self.backbone.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        gh, gw = self.backbone.token_grid
        skip = self.backbone.num_prefix_tokens
        return [grabbed[i][:, skip:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in self.block_indices]


def _fcn_head(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models.segmentation.fcn import FCNHead

    return FCNHead(in_channels, num_classes)


class Segmenter(nn.Module):
    """backbone + decode head -> per-pixel logits [B, num_classes, H, W] at the input's size."""

    def __init__(self, backbone: nn.Module, head: str, num_classes: int, *, channels: int = 512,
                 aux_weight: float = 0.4) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"segmentation head {head!r}: use one of {HEADS}")
        self.head_name, self.num_classes, self.aux_weight = head, num_classes, aux_weight
        if head == "fcn":
            self.features = BackboneFeatures(backbone, levels=1)
            self.decode = _fcn_head(self.features.channels[-1], num_classes)
            self.aux = None
            return
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        self.features = BackboneFeatures(backbone, levels=4)
        # smp's decoder reads levels [1/4 .. 1/32] after two finer ones that UperNet skips: two placeholders
        self.decode = UPerNetDecoder([0, 0, *self.features.channels], encoder_depth=5, decoder_channels=channels)
        self.classify = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.aux = _fcn_head(self.features.channels[2], num_classes) if aux_weight > 0 else None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's parameters kept out of weight decay (position embeddings and tables, class tokens), by
        their names here: what timm's optimizer factory reads."""
        backbone = self.features.backbone
        names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        return {f"features.backbone.{n}" for n in names}

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """Logits at the input's size; with_aux (training): (logits, auxiliary logits or None)."""
        maps = self.features(x)
        if self.head_name == "fcn":
            logits = self.decode(maps[-1])
        else:
            logits = self.classify(self.decode([None, None, *maps]))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not with_aux:
            return logits
        aux = None
        if self.aux is not None:
            aux = F.interpolate(self.aux(maps[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux
