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
    aligner = LabelAligner(initial_label_factors(one_hot, mixed, smoothing=0.1))  # every slot smoothed
    out = model.forward_train(mixed.images, attn_callback=aligner)
    loss = soft_cross_entropy(out.cls_logits, aligner.cls_target())

Factored labels. Every initial label is a combination of three vectors per image: its label y_b, its
partner's y_{B-1-b} and the uniform 1/C (label smoothing, in every slot as the original code does).
Each block's update is a left-multiplication by a [T, T] matrix, so the labels stay such combinations: Y = K @ basis with
coefficients K [B, T, 3] and basis [B, 3, C] (:class:`FactoredLabels`, :func:`initial_label_factors`).
The aligner moves K only (A @ K instead of A @ Y: 3 columns instead of C) and forms labels where a
target is read. The attention is then only needed as products with 3 columns, which the model's
``AttentionMap`` computes next to its fused attention (``tlvit.models.attention``), and only for
the rows read: after the last block, ``cls_target`` needs the class row alone. Dense labels
[B, T, C] (:func:`initial_labels`) are accepted too and moved in full, as before (basis = identity).

Variants (TL-Align Table 8): ``all`` (default, every block), ``layers`` (only the listed blocks),
``last`` (TransMix's re-weighting with the last block's class attention; the paper's "TL-Align-S
(Layer 12), equivalent to TransMix") and ``no_norm`` ("Normalization Disabled", see
:class:`LabelAligner`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from tlvit.losses import smooth
from tlvit.mixing import Mixed, mix_targets, mix_token_targets
from tlvit.models.attention import AttentionMap

__all__ = ["VARIANTS", "SMOOTHING_SLOTS", "FactoredLabels", "initial_labels", "initial_label_factors", "LabelAligner"]

VARIANTS = ("all", "layers", "last", "no_norm")


SMOOTHING_SLOTS = ("every_slot", "class_slot")


def initial_labels(y: torch.Tensor, mixed: Mixed, smoothing: float = 0.0, slots: str = "every_slot") -> torch.Tensor:
    """Label embedding Y^0 [B, 1 + N, C] of a mixed batch (TL-Align Eq. 5), class token first.

    y: [B, C] per-image label distributions (one-hot, or already smoothed with smoothing=0).
    Class slot: the area-mixed label lam * y + (1 - lam) * y.flip(0). Token slots: token_own * y +
    (1 - token_own) * y.flip(0): one-hot of the source image for whole patches, the within-patch share
    for patches cut by a pixel box, lam for MixUp (Sec. 3.3).
    slots="every_slot" (default, the original code's `token_label(target, C, mask, smoothing)`): every
    slot is smoothed by `smoothing`, so the aligned target is smooth(aligned unsmoothed labels) after
    any number of blocks. slots="class_slot": only the class slot is smoothed and the token slots stay
    one-hot (tlvit's earlier initialisation; a deviation switch, `supervision.align_smoothing`): the
    class slot's share shrinks with depth, and with it the effective smoothing of the target.
    The same labels, factored, are :func:`initial_label_factors` (what training uses).
    """
    if slots not in SMOOTHING_SLOTS:
        raise ValueError(f"smoothing slots must be one of {SMOOTHING_SLOTS}, not {slots!r}")
    n = mixed.token_own.shape[-1]
    cls = smooth(mix_targets(y, mixed.lam), smoothing)
    tokens = mix_token_targets(y[:, None, :].expand(-1, n, -1), mixed.token_own.to(y.device))
    if slots == "every_slot":
        tokens = smooth(tokens, smoothing)
    return torch.cat([cls[:, None], tokens], dim=1)


@dataclass(frozen=True)
class FactoredLabels:
    """Labels Y [B, T, C] held as coefficients [B, T, K] @ basis [B, K, C], K small.

    uniform: index of the basis row that is the uniform distribution 1/C (needed to smooth a label in
    coefficient form, as variant="last" does), or None.
    """

    coeffs: torch.Tensor
    basis: torch.Tensor
    uniform: Optional[int] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.coeffs.shape[0], self.coeffs.shape[1], self.basis.shape[-1]

    def dense(self) -> torch.Tensor:
        """The labels [B, T, C]."""
        return torch.bmm(self.coeffs, self.basis)


def initial_label_factors(y: torch.Tensor, mixed: Mixed, smoothing: float = 0.0,
                          slots: str = "every_slot") -> FactoredLabels:
    """:func:`initial_labels`, factored: coefficients [B, 1 + N, 3] over the basis (y, y.flip(0), 1/C).

    Every kind of `tlvit.mixing` mixes sample b with sample B-1-b only, so three basis vectors cover
    all of them: class slot ((1 - eps) lam, (1 - eps)(1 - lam), eps), token i ((1 - eps) own_i,
    (1 - eps)(1 - own_i), eps) with slots="every_slot", (own_i, 1 - own_i, 0) with "class_slot";
    eps = `smoothing` (no smoothing for eps <= 0, as `tlvit.losses.smooth`). y may be soft; it is used
    in float32. `dense()` of the result equals `initial_labels(y, mixed, smoothing, slots)` (float rounding).
    """
    if y.ndim != 2:
        raise ValueError(f"y must be [B, C] label distributions, got shape {tuple(y.shape)}")
    if slots not in SMOOTHING_SLOTS:
        raise ValueError(f"smoothing slots must be one of {SMOOTHING_SLOTS}, not {slots!r}")
    B, C = y.shape
    y = y.detach().float()
    own = mixed.token_own.to(device=y.device, dtype=torch.float32)
    own = own.expand(B, -1) if own.ndim == 1 else own
    lam, eps = float(mixed.lam), (float(smoothing) if smoothing > 0 else 0.0)
    basis = torch.stack([y, y.flip(0), torch.full_like(y, 1.0 / C)], dim=1)  # [B, 3, C]
    cls = torch.tensor([(1.0 - eps) * lam, (1.0 - eps) * (1.0 - lam), eps], device=y.device).expand(B, 1, 3)
    keep = 1.0 - eps if slots == "every_slot" else 1.0
    tokens = torch.stack([keep * own, keep * (1.0 - own), torch.full_like(own, 1.0 - keep)], dim=-1)  # [B, N, 3]
    return FactoredLabels(torch.cat([cls, tokens], dim=1), basis, uniform=2)


Attn = Union[torch.Tensor, AttentionMap]  # a block's head-averaged attention [B, T, T], dense or lazy


class LabelAligner:
    """Propagates token labels with the attention maps, one block at a time; the model's ``attn_callback``.

    Args:
        labels: initial labels, class token first: :class:`FactoredLabels` from :func:`initial_label_factors`
            (moves 3 coefficients per token), or a dense [B, 1 + N, C] tensor from :func:`initial_labels`
            (moves all C; the same targets up to float rounding).
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
        smoothing: label smoothing that variant="last" applies to its attention-weighted label: pass the
            value given to initial_labels when its token slots are unsmoothed (slots="class_slot"), 0 when
            they already carry it (slots="every_slot": the weighted label is then smoothed already);
            unused by the other variants.

    Each block reports its attention as ``aligner(layer, attn)``: a [B, 1+N, 1+N] tensor, or the model's
    lazy ``AttentionMap`` (``accepts_attention_map``), of which only products with the coefficients
    are computed. A block's map is applied to the token rows when the next block reports or a token
    target is read; reading the class target after the last block computes the class row alone.
    After a forward pass: :meth:`cls_target`, :meth:`mean_token_target`, :meth:`token_targets`, and
    `history` (the class label after each block, for Fig. 3's per-layer RMSE, see :meth:`rmse_per_layer`).
    All label maths runs in float32 without gradient, also under autocast.
    One aligner per batch: blocks must report in order 0, 1, 2, ... exactly once.
    """

    accepts_attention_map = True  # the model hands it AttentionMap objects and keeps its fused attention

    def __init__(
            self,
            labels: Union[torch.Tensor, FactoredLabels],
            variant: str = "all",
            layers: Optional[Sequence[int]] = None,
            smoothing: float = 0.0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"TL-Align variant must be one of {VARIANTS}, not {variant!r}")
        if (variant == "layers") != (layers is not None):
            raise ValueError("`layers` is required by variant='layers' and only meaningful there")
        if len(labels.shape) != 3:
            raise ValueError(f"labels must be [B, 1 + N, C], got shape {tuple(labels.shape)}")
        if isinstance(labels, FactoredLabels):
            coeffs, basis, uniform = labels.coeffs, labels.basis, labels.uniform
            if basis.shape[:2] != (coeffs.shape[0], coeffs.shape[2]):
                raise ValueError(f"basis {tuple(basis.shape)} does not fit coefficients {tuple(coeffs.shape)}")
            if variant == "last" and smoothing > 0 and uniform is None:
                raise ValueError("variant='last' with smoothing needs the uniform vector in the label basis")
        else:
            coeffs, basis, uniform = labels, None, None
        self.variant = variant
        self.layers = frozenset(int(i) for i in layers or ())
        self.smoothing = smoothing
        self._coeffs = coeffs.detach().float().clone()  # K^l [B, 1 + N, K]: the labels are K^l @ basis
        self._basis = None if basis is None else basis.detach().float()  # [B, K, C]; None: K^l are the labels
        self._uniform = uniform
        self._area = self._coeffs[:, 0].clone()  # class slot of Y^0: the mixing's own target
        self._history: List[Optional[torch.Tensor]] = []  # class-row coefficients [B, K] after each block
        self._pending: Optional[Attn] = None  # the last moving block's map, not yet applied to the rows
        self._pending_cls: Optional[torch.Tensor] = None  # class row [B, K] after the pending block, once read
        self._transmix: Optional[torch.Tensor] = None

    @contextmanager
    def _exact(self) -> Iterator[None]:
        """Stop-gradient (Eq. 12), and float32 even under autocast, so rows keep summing to 1 over many blocks."""
        with torch.no_grad(), torch.autocast(self._coeffs.device.type, enabled=False):
            yield

    def __call__(self, layer: int, attn: Attn) -> None:
        """Take block `layer`'s head-averaged softmax attention [B, 1 + N, 1 + N] (tensor or AttentionMap)."""
        if layer != len(self._history):
            raise RuntimeError(f"block {layer} reported after {len(self._history)} blocks: "
                               "blocks must report in order, and each batch needs a new LabelAligner")
        B, T, _ = self._coeffs.shape
        if tuple(attn.shape) != (B, T, T):
            raise ValueError(f"attention {tuple(attn.shape)} does not fit labels of {T} tokens x batch {B}")
        with self._exact():
            if self.variant == "last":
                # Every block's TransMix target is recorded; the last one reported is the target.
                self._transmix = self._transmix_target(attn)
                self._history.append(self._transmix)
                return
            self._flush()
            if self.variant != "layers" or layer in self.layers:
                self._pending = attn  # applied when the next block reports or a target is read
                self._history.append(None)
            else:
                self._history.append(self._coeffs[:, 0].clone())

    @staticmethod
    def _apply(attn: Attn, v: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """attn[:, rows] @ v in v's dtype, v [B, T, m] -> [B, R, m]."""
        if isinstance(attn, torch.Tensor):
            a = attn.detach().to(v)
            return (a if rows is None else a[:, rows]) @ v
        return attn.apply(v, rows)

    def _update(self, aligned: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """TL-Align-S (Eqs. 7, 9): labels mixed like the tokens; Eq. 11: the residual connection and Norm
        (a simple average), except for no_norm. The MLP half of the block leaves labels unchanged."""
        return aligned if self.variant == "no_norm" else (aligned + old) / 2

    def _resolve_cls(self) -> None:
        """The class row after the pending block, without moving the token rows yet."""
        if self._pending is not None and self._pending_cls is None:
            with self._exact():
                row = self._apply(self._pending, self._coeffs, slice(0, 1))
                self._pending_cls = self._update(row, self._coeffs[:, :1])[:, 0]
                self._history[-1] = self._pending_cls

    def _flush(self) -> None:
        """Apply the pending block's map to every row."""
        if self._pending is None:
            return
        with self._exact():
            new = self._update(self._apply(self._pending, self._coeffs), self._coeffs)
            if self._pending_cls is not None:  # keep the class row already handed out
                new[:, 0] = self._pending_cls
            self._coeffs = new
            self._history[-1] = new[:, 0].clone()
        self._pending = self._pending_cls = None

    def _dense(self, c: torch.Tensor) -> torch.Tensor:
        """Labels of coefficients c [B, K] or [B, T, K]: [B, C] or [B, T, C]."""
        if self._basis is None:
            return c
        with self._exact():
            return torch.bmm(c[:, None], self._basis)[:, 0] if c.ndim == 2 else torch.bmm(c, self._basis)

    def _smooth(self, c: torch.Tensor) -> torch.Tensor:
        """Coefficients [B, K] of smooth(label of c, self.smoothing)."""
        if self.smoothing <= 0 or self._basis is None:
            return smooth(c, self.smoothing)
        out = c * (1 - self.smoothing)
        out[:, self._uniform] += self.smoothing
        return out

    def _transmix_target(self, attn: Attn) -> torch.Tensor:
        """Coefficients [B, K] of TransMix's class target, from one block's attention (class row only)."""
        B, T, K = self._coeffs.shape
        # [token labels | 1] with the class slot zeroed: one product gives sum_i a_i y_i and sum_i a_i over patches.
        v = torch.cat([self._coeffs, self._coeffs.new_ones(B, T, 1)], dim=-1)
        v[:, 0] = 0
        r = self._apply(attn, v, slice(0, 1))[:, 0]  # [B, K + 1]
        attn_label = r[:, :K] / r[:, K:]  # lam_attn = w_box / (w_box + w_rest) in TransMix
        return 0.5 * self._area + 0.5 * self._smooth(attn_label)

    @property
    def labels(self) -> torch.Tensor:
        """Current labels Y^l [B, 1 + N, C] (formed from the coefficients)."""
        self._flush()
        return self._dense(self._coeffs)

    @property
    def area_target(self) -> torch.Tensor:
        """[B, C] class slot of the initial labels: the mixing's own (area) target."""
        return self._dense(self._area)

    @property
    def history(self) -> List[torch.Tensor]:
        """[B, C] class label after each block reported so far (TransMix's target for 'last')."""
        self._resolve_cls()
        return [self._dense(h) for h in self._history]

    def cls_target(self) -> torch.Tensor:
        """[B, C] target of the class token (DeiT): its aligned label y^L_cls (or TransMix's for 'last')."""
        if self.variant == "last":
            return self._dense(self._area if self._transmix is None else self._transmix)
        self._resolve_cls()
        return self._dense(self._coeffs[:, 0] if self._pending_cls is None else self._pending_cls)

    def mean_token_target(self) -> torch.Tensor:
        """[B, C] target of a pooling model (Swin): mean of the output tokens' labels (Sec. 3.3)."""
        self._flush()
        return self._dense(self._coeffs[:, 1:].mean(dim=1))

    def token_targets(self) -> torch.Tensor:
        """[B, N, C] aligned labels of the output patch tokens (unchanged initial labels for 'last')."""
        self._flush()
        return self._dense(self._coeffs[:, 1:])

    def rmse_per_layer(self, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[L] RMSE over samples and classes between `reference` [B, C] (default: the area target) and
        the class label after each block (TL-Align Fig. 3 plots the last block's value per model)."""
        ref = self.area_target if reference is None else reference.to(self._coeffs)
        history = self.history
        if not history:
            return torch.zeros(0)
        return torch.stack([(h - ref).pow(2).mean().sqrt() for h in history])
