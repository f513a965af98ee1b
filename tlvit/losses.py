"""Losses as small modules (DeiT's losses.py style). Targets are distributions [B, C] / [B, N, C]."""
from __future__ import annotations

import torch
import torch.nn as nn


def smooth(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing of a distribution over the last dim: (1 - eps) p + eps / C."""
    return p * (1 - eps) + eps / p.shape[-1] if eps > 0 else p


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over leading dims of H(target, softmax(logits)); logits/target [..., C]."""
    return torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()


class ClassTokenLoss(nn.Module):
    """Soft-target cross-entropy on the class token (standard and ReLabel supervision)."""

    def forward(self, cls_logits: torch.Tensor, cls_target: torch.Tensor, token_logits=None, token_target=None) -> torch.Tensor:
        return soft_cross_entropy(cls_logits, cls_target)


class TokenLabelingLoss(nn.Module):
    """L = H(X_cls, y_cls) + beta * mean_i H(X_i, y_i) (LV-ViT Eq. 7; beta = 0.5 in the paper).

    The original code's default is beta = 1.0 with y_cls the pooled annotator label: set
    `token_weight: 1.0` and `cls_target: annotator` (see docs/deviations.md).
    """

    def __init__(self, token_weight: float = 0.5):
        super().__init__()
        self.token_weight = token_weight

    def forward(self, cls_logits: torch.Tensor, cls_target: torch.Tensor, token_logits: torch.Tensor,
                token_target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(cls_logits, cls_target) + self.token_weight * soft_cross_entropy(token_logits, token_target)
