"""A small all-convolutional annotator for the embedded default (stand-in for NFNet-F6 on ImageNet).

Stride 4 (a 16 x 16 score map at 64 px), receptive field ~61 px (the last two convs dilated 2 and 4, at no extra
cost): a location sees the digit under it whole, with its neighbours, so its classifier, applied densely as a
1x1 conv, can name the digit under it (trained on composed canvases: docs/annotator.md; a 37-px field gave
91.7% instead of 96.2% on primary-digit pixels, whose edges it saw only in part).
Built like a timm model (forward_features / forward_head / get_classifier) and registered in timm,
so the annotator code path is the same for it and for `dm_nfnet_f6`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs


class AnnotatorCNN(nn.Module):
    """Conv stack [B, 3, H, W] -> features [B, C, H/4, W/4] -> global average pool -> linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 32, 64, 64, 64),
                 strides: tuple[int, ...] = (1, 2, 1, 2, 1, 1), dilations: tuple[int, ...] = (1, 1, 1, 1, 2, 4),
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        layers, c_in = [], in_chans
        for c_out, s, d in zip(widths, strides, dilations):
            layers.append(ConvNormAct(c_in, c_out, 3, stride=s, dilation=d))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c_in, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "annotator_cnn.embedded": {
        "url": "", "num_classes": 10, "input_size": (3, 64, 64), "pool_size": (16, 16), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.1, 0.1, 0.1), "std": (0.25, 0.25, 0.25),
        "first_conv": "features.0.conv", "classifier": "fc",
    },
})


@register_model
def annotator_cnn(pretrained: bool = False, **kwargs) -> AnnotatorCNN:
    """Embedded-default annotator (~0.1M params)."""
    return build_model_with_cfg(AnnotatorCNN, "annotator_cnn", pretrained, **kwargs)
