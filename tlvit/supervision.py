"""What each row is trained against: batch -> (class-token target, token targets) + the loss.

kinds (LV-ViT Table 3/6):
  ce              one-hot image label (smoothed) on the class token
  relabel         ReLabel: the crop's pooled score map on the class token
  token_labeling  image label on the class token + the crop's S x S score-map grid on the patch tokens
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlvit.labels.geometry import resample_label_maps
from tlvit.labels.score_maps import topk_to_dense
from tlvit.losses import ClassTokenLoss, TokenLabelingLoss

KINDS = ("ce", "relabel", "token_labeling")


def smooth(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing of a distribution over the last dim."""
    return p * (1 - eps) + eps / p.shape[-1] if eps > 0 else p


@dataclass
class Supervision:
    kind: str
    num_classes: int
    token_grid: tuple[int, int]
    label_smoothing: float = 0.1
    token_weight: float = 0.5
    cls_target: str = "label"  # label | annotator
    absent_classes: str = "zero_prob"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"supervision.kind must be one of {KINDS}, not {self.kind!r}")
        if self.cls_target not in ("label", "annotator"):
            raise ValueError(f"supervision.cls_target must be 'label' or 'annotator', not {self.cls_target!r}")
        self.loss = TokenLabelingLoss(self.token_weight) if self.kind == "token_labeling" else ClassTokenLoss()

    @property
    def needs_score_maps(self) -> bool:
        return self.kind != "ce" or self.cls_target == "annotator"

    @property
    def dense(self) -> bool:
        return self.kind == "token_labeling"

    def targets(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cls target [B, C], token targets [B, N, C] or None), built on `device`."""
        label = F.one_hot(batch["label"].to(device), self.num_classes).float()
        if not self.needs_score_maps:
            return smooth(label, self.label_smoothing), None
        maps = topk_to_dense(batch["topk_logits"].to(device), batch["topk_classes"].to(device), self.num_classes,
                             self.absent_classes)
        cells, pooled = resample_label_maps(maps, batch["theta"].to(device), self.token_grid)
        use_pooled = self.kind == "relabel" or self.cls_target == "annotator"
        cls = smooth(pooled if use_pooled else label, self.label_smoothing)
        if not self.dense:
            return cls, None
        tokens = smooth(cells.flatten(2).transpose(1, 2), self.label_smoothing)  # [B, Gh*Gw, C]
        return cls, tokens

    def __call__(self, out, cls_target: torch.Tensor, token_target: torch.Tensor | None) -> torch.Tensor:
        return self.loss(out.cls_logits, cls_target, out.token_logits, token_target)
