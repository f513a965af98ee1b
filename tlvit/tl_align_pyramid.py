"""Token-Label Alignment on hierarchical transformers (TL-Align, Xiao et al., ICCV 2023, arXiv:2210.06455:
Table 1's Swin rows; the label rules of its Appendix, Table 10).

The labels of a pyramid model live on its token grid [B, H, W, K] and follow the model's own geometry, one
operation at a time, as timm's Swin Transformer computes it:

* window attention (W-MSA / SW-MSA): the labels are cyclically shifted like the features, cut into the same
  windows, mixed by the window's head-averaged softmax attention (relative position bias and the shift mask
  included, before dropout), put back and shifted back; the residual connection averages them with the labels
  before the block (Eq. 11's Norm), or not at all for the ``no_norm`` ablation. The MLP, the LayerNorms and the
  projections act on each token alone and leave labels as they are.
* patch merging: the 2x2 labels a merged token is made of are added, then normalised (Sec. 3.3; a zero-padded border
  cell, where timm pads an odd grid, carries no label mass).
* PVT's spatial-reduction attention (timm's PVT-v2): the keys are the tokens aggregated by a strided conv (or
  pooled to 7x7 in the linear variant), so the key labels are the aggregated labels, added and normalised; each
  query's label becomes the attention-weighted key labels, then the residual average. PVT-v2's overlapping patch
  embedding between stages (3x3, stride 2) aggregates like a pooling: the labels under the kernel, added and
  normalised. PVT-v2's MLP holds a 3x3 depthwise conv, a per-channel spatial mixing that has no single token-mixing
  matrix: its labels pass through, as Table 10 treats the MLP (documented deviation `pvt_v2`, docs/deviations.md).
* the target of a pooling model is the mean of its output tokens' labels (Sec. 3.3), which is what timm's
  average-pooling head sees.

The attention is read by hooks on timm's modules (:meth:`PyramidLabelAligner.attached`): a forward hook on each
``WindowAttention``'s softmax (Swin) or on the attention dropout, whose input is the softmax (PVT-v2); the layers
are switched to their explicit softmax path while labels are aligned (the same function as the fused kernel). A hook
on each block moves the labels once the block has run, and one on each ``PatchMerging`` / stage patch embedding
aggregates them. The window geometry is timm's own (``window_partition`` / ``window_reverse``,
the block's ``window_size`` and ``shift_size``), so it is whatever timm does at any resolution. Where timm pads a
grid that the window does not divide, the padded tokens take part in the attention with zero labels, so some label
mass is lost there (as the features mix with the zero padding); at the papers' resolutions and the embedded
analogs' no grid is padded.

Labels are held as coefficients over a small basis (:class:`tlvit.tl_align.FactoredLabels`: the image's label,
its partner's and the uniform vector), as the ViT aligner holds them; all label maths is float32 (or the labels'
own wider dtype) without gradient (the stop-gradient of Eq. 12).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from tlvit.tl_align import FactoredLabels

__all__ = ["PYRAMID_VARIANTS", "PyramidLabelAligner", "window_mix"]

PYRAMID_VARIANTS = ("all", "layers", "no_norm")  # TransMix's last-layer variant needs a class token


def window_mix(labels: torch.Tensor, attn: torch.Tensor, window_size: Tuple[int, int],
               shift_size: Tuple[int, int]) -> torch.Tensor:
    """Labels [B, H, W, K] mixed by (shifted) window attention attn [B * nW, n, n] as timm's Swin block mixes
    its features: roll by -shift, pad to whole windows, partition, attn @ labels per window, reverse, crop, roll
    back. Returns [B, H, W, K]."""
    from timm.models.swin_transformer import window_partition, window_reverse

    B, H, W, K = labels.shape
    x = torch.roll(labels, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2)) if any(shift_size) else labels
    pad_h, pad_w = (-H) % window_size[0], (-W) % window_size[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    windows = window_partition(x, window_size).reshape(-1, window_size[0] * window_size[1], K)
    if attn.shape[0] != windows.shape[0] or attn.shape[-1] != windows.shape[1]:
        raise ValueError(f"window attention {tuple(attn.shape)} does not fit {windows.shape[0]} windows of "
                         f"{windows.shape[1]} tokens (labels {tuple(labels.shape)}, window {window_size})")
    windows = torch.bmm(attn.to(windows.dtype), windows)
    x = window_reverse(windows.view(-1, window_size[0], window_size[1], K), window_size, Hp, Wp)[:, :H, :W]
    return torch.roll(x, shifts=shift_size, dims=(1, 2)) if any(shift_size) else x


def merge_2x2(labels: torch.Tensor) -> torch.Tensor:
    """Patch merging: labels [B, H, W, K] -> [B, ceil(H/2), ceil(W/2), K], each the normalised sum of its 2x2
    cell (timm pads an odd grid with zeros at the bottom/right, as here; the normalisation drops them)."""
    B, H, W, K = labels.shape
    x = F.pad(labels, (0, 0, 0, W % 2, 0, H % 2))
    return _normalised(x.reshape(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, K).sum(dim=(2, 4)))


def aggregate(labels: torch.Tensor, kernel: int, stride: int, padding: int = 0) -> torch.Tensor:
    """Labels [B, H, W, K] of the tokens a (strided) conv aggregates: under each kernel window, added and normalised
    (zero padding carries no label). Returns [B, H', W', K] on the conv's output grid."""
    x = labels.permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=False).permute(0, 2, 3, 1)
    return _normalised(x)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """Each label divided by its mass (Table 10's Norm)."""
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class PyramidLabelAligner:
    """TL-Align's labels through a hierarchical transformer (timm's Swin, PVT-v2): what a pooling model trains against.

    Args:
        labels: the initial labels of the mixed batch, class slot first, as :func:`tlvit.tl_align.initial_label_factors`
            makes them for the model's ``token_grid`` (the class slot is the area target: kept for the RMSE of
            Fig. 3), or a dense [B, 1 + N, C] tensor.
        grid: (H, W) of the first stage's tokens (the model's ``token_grid``); N = H * W.
        variant: ``all`` (every block), ``layers`` (only the listed blocks, 0-based in the order they run across
            the stages; the others pass labels through) or ``no_norm`` (labels follow the attention alone, without
            the residual average). Patch merging applies in every variant.
        layers: the blocks of variant="layers".
    """

    def __init__(self, labels: Union[torch.Tensor, FactoredLabels], grid: Tuple[int, int], variant: str = "all",
                 layers: Optional[Sequence[int]] = None) -> None:
        if variant not in PYRAMID_VARIANTS:
            raise ValueError(f"TL-Align on a pyramid model: variant must be one of {PYRAMID_VARIANTS}, not {variant!r}"
                             " (the last-layer variant reads a class token's attention, which a pooling model has not)")
        if (variant == "layers") != (layers is not None):
            raise ValueError("`layers` is required by variant='layers' and only meaningful there")
        coeffs, basis = (labels.coeffs, labels.basis) if isinstance(labels, FactoredLabels) else (labels, None)
        B, T, K = coeffs.shape
        H, W = grid
        if T != 1 + H * W:
            raise ValueError(f"labels of {T} slots do not fit a class slot and a {H}x{W} token grid")
        dtype = torch.promote_types(coeffs.dtype, torch.float32)
        self.variant, self.layers = variant, frozenset(int(i) for i in layers or ())
        self._area = coeffs[:, 0].detach().to(dtype).clone()
        self._labels = coeffs[:, 1:].detach().to(dtype).reshape(B, H, W, K).clone()
        self._basis = None if basis is None else basis.detach().to(dtype)
        self._attn: Optional[torch.Tensor] = None  # the running block's window attention, until the block ends
        self._history: List[torch.Tensor] = []  # mean label coefficients [B, K] after each block

    @contextmanager
    def _exact(self) -> Iterator[None]:
        """Stop-gradient (Eq. 12), and the labels' own precision inside the model's autocast (the hooks run there)."""
        with torch.no_grad(), torch.autocast(self._labels.device.type, enabled=False):
            yield

    # ------------------------------------------------------------------ the operations, in forward order
    def attention(self, probs: torch.Tensor) -> None:
        """A block's softmax attention [B', heads, n, m]: kept (head-averaged, rows normalised: Table 10's
        Norm(W^s), which also undoes a 16-bit softmax's rounding of the row sums under autocast) until its block ends."""
        with self._exact():
            a = probs.detach().to(self._labels.dtype).mean(dim=1)
            self._attn = a / a.sum(dim=-1, keepdim=True)

    def _end_block(self, mix) -> None:
        """A block ended: labels <- Norm(A Y + Y) (or A Y for no_norm), A Y given by `mix(attention)`."""
        layer, attn, self._attn = len(self._history), self._attn, None
        if attn is None:
            raise RuntimeError(f"block {layer} ended without reporting its attention")
        if self.variant != "layers" or layer in self.layers:
            with self._exact():
                mixed = mix(attn)
                self._labels = mixed if self.variant == "no_norm" else (mixed + self._labels) / 2
        self._history.append(self._labels.mean(dim=(1, 2)))

    def window_block(self, window_size: Tuple[int, int], shift_size: Tuple[int, int]) -> None:
        """A Swin block ended: its (shifted) window attention moves the labels."""
        self._end_block(lambda attn: window_mix(self._labels, attn, tuple(window_size), tuple(shift_size)))

    def reduction_block(self, attn_module: torch.nn.Module) -> None:
        """A PVT-v2 block ended: each query's label is its attention over the reduced keys' labels."""
        def mix(attn: torch.Tensor) -> torch.Tensor:
            B, H, W, K = self._labels.shape
            keys = self._labels
            if getattr(attn_module, "pool", None) is not None:  # linear SRA: keys pooled to 7x7
                keys = _normalised(F.adaptive_avg_pool2d(keys.permute(0, 3, 1, 2), attn_module.pool.output_size)
                                   .permute(0, 2, 3, 1))
            elif getattr(attn_module, "sr", None) is not None:  # SRA: a conv with kernel = stride = R
                keys = aggregate(keys, attn_module.sr.kernel_size[0], attn_module.sr.stride[0])
            return torch.bmm(attn, keys.reshape(B, -1, K)).view(B, H, W, K)
        self._end_block(mix)

    def merge(self) -> None:
        """Swin's patch merging: 2x2 tokens become one."""
        with self._exact():
            self._labels = merge_2x2(self._labels)

    def embed(self, conv: torch.nn.Conv2d) -> None:
        """A PVT-v2 stage's overlapping patch embedding: the labels under each kernel window."""
        with self._exact():
            self._labels = aggregate(self._labels, conv.kernel_size[0], conv.stride[0], conv.padding[0])

    # ------------------------------------------------------------------ hooks on timm's modules
    @contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator["PyramidLabelAligner"]:
        """Hooks on `model`'s blocks, attentions and aggregations (timm's Swin or PVT-v2) for one forward pass."""
        from timm.models import pvt_v2, swin_transformer as swin

        with ExitStack() as stack:
            def hook(module: torch.nn.Module, fn, pre: bool = False) -> None:
                register = module.register_forward_pre_hook if pre else module.register_forward_hook
                stack.enter_context(_removing(register(fn)))

            def explicit(attn: torch.nn.Module) -> None:  # the explicit softmax path, restored afterwards
                stack.callback(setattr, attn, "fused_attn", attn.fused_attn)
                attn.fused_attn = False

            blocks = 0
            for m in model.modules():
                if isinstance(m, swin.SwinTransformerBlock):
                    explicit(m.attn)
                    hook(m.attn.softmax, lambda _m, _inp, out: self.attention(out))
                    hook(m, lambda b, _inp, _out: self.window_block(b.window_size, b.shift_size))
                    blocks += 1
                elif isinstance(m, swin.PatchMerging):
                    hook(m, lambda *_: self.merge())
                elif isinstance(m, pvt_v2.Block):
                    explicit(m.attn)
                    hook(m.attn.attn_drop, lambda _m, inp: self.attention(inp[0]), pre=True)
                    hook(m, lambda b, _inp, _out: self.reduction_block(b.attn))
                    blocks += 1
                elif isinstance(m, pvt_v2.PyramidVisionTransformerStage) and m.downsample is not None:
                    hook(m.downsample, lambda e, *_: self.embed(e.proj))
            if not blocks:
                raise ValueError(f"{type(model).__name__} has no Swin or PVT-v2 blocks to align labels through")
            yield self

    # ------------------------------------------------------------------ what training reads
    def _dense(self, c: torch.Tensor) -> torch.Tensor:
        if self._basis is None:
            return c
        return torch.einsum("b...k,bkc->b...c", c, self._basis)

    def mean_token_target(self) -> torch.Tensor:
        """[B, C] the pooling model's target: the mean of its output tokens' labels."""
        return self._dense(self._labels.mean(dim=(1, 2)))

    cls_target = mean_token_target  # a pooling model's class prediction is its pooled tokens'

    def token_targets(self) -> torch.Tensor:
        """[B, h * w, C] labels of the last stage's tokens, row-major."""
        return self._dense(self._labels.flatten(1, 2))

    @property
    def area_target(self) -> torch.Tensor:
        """[B, C] the mixing's own (area) target."""
        return self._dense(self._area)

    @property
    def history(self) -> List[torch.Tensor]:
        """[B, C] mean token label after each block."""
        return [self._dense(h) for h in self._history]

    def rmse_per_layer(self, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[L] RMSE between `reference` (default the area target) and the mean token label after each block."""
        ref = self.area_target if reference is None else reference.to(self._labels)
        return torch.stack([(h - ref).pow(2).mean().sqrt() for h in self.history]) if self._history else torch.zeros(0)


@contextmanager
def _removing(handle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()
