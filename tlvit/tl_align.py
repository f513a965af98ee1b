"""Token-Label Alignment (Xiao et al., "Token-Label Alignment for Vision Transformers", Sec. 3.3).

Every token carries a label (a distribution over classes). The labels start from the mixing
(:func:`initial_labels`, Eq. 5) and are moved through the network with the model's own attention:
in each block the labels are mixed by the head-averaged attention (Eqs. 7, 9) and averaged with
themselves for the residual connection (Eq. 11, "Norm" = a simple average); the MLP, the
LayerNorms and the projections act on each token alone and leave labels unchanged (Appendix D,
Table 10). The label that reaches the class token is DeiT's training target; pooling models
(Swin) take the mean of the output-token labels. Targets carry no gradient (Eq. 12).

:class:`LabelAligner` is the model's ``attn_callback``::

    mixed = mix_images(x, "cutmix_patch", model.token_grid, gen)
    aligner = LabelAligner(initial_labels(one_hot, mixed, smoothing=0.1))
    out = model.forward_train(mixed.images, attn_callback=aligner)
    loss = soft_cross_entropy(out.cls_logits, aligner.cls_target())

Variants (TL-Align Table 8): ``all`` (default, every block), ``layers`` (only the listed blocks),
``last`` (TransMix's re-weighting with the last block's class attention; the paper's "TL-Align-S
(Layer 12), equivalent to TransMix") and ``no_norm`` ("Normalization Disabled", see
:class:`LabelAligner`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from tlvit.losses import smooth
from tlvit.mixing import Mixed, mix_targets, mix_token_targets

__all__ = ["VARIANTS", "initial_labels", "LabelAligner"]

VARIANTS = ("all", "layers", "last", "no_norm")


def initial_labels(y: torch.Tensor, mixed: Mixed, smoothing: float = 0.0) -> torch.Tensor:
    """Label embedding Y^0 [B, 1 + N, C] of a mixed batch (TL-Align Eq. 5), class token first.

    y: [B, C] per-image label distributions (one-hot, or already smoothed with smoothing=0).
    Class slot: the area-mixed label lam * y + (1 - lam) * y.flip(0), smoothed by `smoothing`.
    Token slots: token_own * y + (1 - token_own) * y.flip(0), not smoothed: one-hot of the source image
    for whole patches, the within-patch share for patches cut by a pixel box, lam for MixUp (Sec. 3.3).
    This is the original code's initialisation: a smoothed mixed target on the class token (timm's
    Mixup) and one-hot labels of each patch's source on the tokens.
    """
    n = mixed.token_own.shape[-1]
    cls = smooth(mix_targets(y, mixed.lam), smoothing)
    tokens = mix_token_targets(y[:, None, :].expand(-1, n, -1), mixed.token_own.to(y.device))
    return torch.cat([cls[:, None], tokens], dim=1)


class LabelAligner:
    """Propagates token labels with the attention maps, one block at a time; the model's ``attn_callback``.

    Args:
        labels: initial labels [B, 1 + N, C] (class token first), e.g. from :func:`initial_labels`.
        variant: one of VARIANTS:
            all      every block: Y <- (A Y + Y) / 2, A = head-averaged attention [B, 1+N, 1+N] (Eqs. 9, 11).
            layers   the same, only in the blocks listed in `layers` (0-based; the paper's 1-based
                     "Layer 2,4,6,8" of DeiT-S is layers=(1, 3, 5, 7)); other blocks leave labels as they are.
            last     TransMix (Chen et al., 2022): no propagation; the class target is
                     0.5 * area target + 0.5 * smooth(sum_i a_i y_i / sum_i a_i), with a_i the last block's
                     class-token attention to patch i and y_i the initial token labels, i.e. the area lam
                     averaged with the attention-weighted lam, as TransMix's code does (ratio 0.5). The
                     literal "TL-Align-S at layer 12 only" is variant="layers", layers=(depth - 1,).
            no_norm  Y <- A Y. Eq. 11's Norm is the average of the two residual branches; dropping only
                     the division would double every row per block (and renormalising at the end gives
                     back the default exactly, the update being linear), so the ablation that can differ
                     is alignment without the residual term: labels follow the attention alone.
        layers: block indices for variant="layers" (required there, refused otherwise).
        smoothing: label smoothing that variant="last" applies to its attention-weighted label (pass the
            value given to initial_labels); unused by the other variants.

    After a forward pass: :meth:`cls_target`, :meth:`mean_token_target`, :meth:`token_targets`, and
    `history` (the class label after each block, for Fig. 3's per-layer RMSE, see :meth:`rmse_per_layer`).
    One aligner per batch: blocks must report in order 0, 1, 2, ... exactly once.
    """

    def __init__(
            self,
            labels: torch.Tensor,
            variant: str = "all",
            layers: Optional[Sequence[int]] = None,
            smoothing: float = 0.0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"TL-Align variant must be one of {VARIANTS}, not {variant!r}")
        if (variant == "layers") != (layers is not None):
            raise ValueError("`layers` is required by variant='layers' and only meaningful there")
        if labels.ndim != 3:
            raise ValueError(f"labels must be [B, 1 + N, C], got shape {tuple(labels.shape)}")
        self.variant = variant
        self.layers = frozenset(int(i) for i in layers or ())
        self.smoothing = smoothing
        self.labels = labels.detach().float().clone()  # Y^l [B, 1 + N, C]
        self.area_target = self.labels[:, 0].clone()  # Y^0 of the class token: the mixing's own target
        self.history: List[torch.Tensor] = []  # [B, C] class label after each block
        self._transmix: Optional[torch.Tensor] = None

    def __call__(self, layer: int, attn: torch.Tensor) -> None:
        """Update the labels with block `layer`'s head-averaged softmax attention [B, 1 + N, 1 + N]."""
        if layer != len(self.history):
            raise RuntimeError(f"block {layer} reported after {len(self.history)} blocks: "
                               "blocks must report in order, and each batch needs a new LabelAligner")
        B, T, _ = self.labels.shape
        if attn.shape != (B, T, T):
            raise ValueError(f"attention {tuple(attn.shape)} does not fit labels of {T} tokens x batch {B}")
        # Stop-gradient (Eq. 12); float32 even under autocast, so rows keep summing to 1 over many blocks.
        with torch.no_grad(), torch.autocast(self.labels.device.type, enabled=False):
            a = attn.detach().to(self.labels)
            if self.variant == "last":
                # Every block's TransMix target is recorded; the last one reported is the target.
                self._transmix = self._transmix_target(a)
                self.history.append(self._transmix)
                return
            if self.variant != "layers" or layer in self.layers:
                aligned = a @ self.labels  # TL-Align-S, Eqs. 7 and 9: labels mixed like the tokens
                # Eq. 11: residual connection + Norm (a simple average); the MLP half leaves Y unchanged.
                self.labels = aligned if self.variant == "no_norm" else (aligned + self.labels) / 2
            self.history.append(self.labels[:, 0].clone())

    def _transmix_target(self, a: torch.Tensor) -> torch.Tensor:
        """TransMix's class target [B, C] from one attention map [B, 1 + N, 1 + N]."""
        w = a[:, 0, 1:]  # class token -> patches, [B, N]
        w = w / w.sum(-1, keepdim=True)  # lam_attn = w_box / (w_box + w_rest) in TransMix
        attn_label = torch.bmm(w[:, None], self.labels[:, 1:])[:, 0]  # sum_i w_i y_i, [B, C]
        return 0.5 * self.area_target + 0.5 * smooth(attn_label, self.smoothing)

    def cls_target(self) -> torch.Tensor:
        """[B, C] target of the class token (DeiT): its aligned label y^L_cls (or TransMix's for 'last')."""
        if self.variant == "last":
            return self.area_target if self._transmix is None else self._transmix
        return self.labels[:, 0]

    def mean_token_target(self) -> torch.Tensor:
        """[B, C] target of a pooling model (Swin): mean of the output tokens' labels (Sec. 3.3)."""
        return self.labels[:, 1:].mean(dim=1)

    def token_targets(self) -> torch.Tensor:
        """[B, N, C] aligned labels of the output patch tokens (unchanged initial labels for 'last')."""
        return self.labels[:, 1:]

    def rmse_per_layer(self, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[L] RMSE over samples and classes between `reference` [B, C] (default: the area target) and
        the class label after each block (TL-Align Fig. 3 plots the last block's value per model)."""
        ref = self.area_target if reference is None else reference.to(self.area_target)
        if not self.history:
            return torch.zeros(0)
        return torch.stack([(h - ref).pow(2).mean().sqrt() for h in self.history])
