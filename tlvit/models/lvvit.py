"""LV-ViT: vision transformers trained with Token Labeling (Jiang et al., NeurIPS 2021).

The class :class:`LvViT` is a plain pre-norm ViT with the paper's four architectural knobs, each a
constructor argument so every ablation row is one set of keyword arguments:

* patch embedding as a list of conv kernels/strides (Table 4): conv-BN-ReLU layers of ``stem_chs``
  filters, then a projection conv to ``embed_dim``; ``(16,), (16,)`` is DeiT's single 16x16 conv;
* residual scaling ``x = x + F(norm(x)) / skip_lam`` (Table 5);
* LayerNorm or GroupNorm over tokens in the blocks (``norm_groups``, Table 9);
* depth / width / heads / MLP ratio (Tables 3 and 8);

plus the token-labeling parts: an ``aux_head`` (Linear over patch tokens), MixToken inside
:meth:`LvViT.forward_train`, and the ``cls + 0.5 * max(aux)`` inference of the original code.
DeiT (``deit.py``) is the same class with a single-conv stem, so DeiT and LV-ViT share one training
interface and the Table 3 path from DeiT-S to LV-ViT-S is a sequence of keyword changes.

Layout follows timm: blocks -> model -> checkpoint filter -> default cfgs -> builder -> registrations.
"""
from __future__ import annotations

import re

from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .attention import Attention, AttentionMap, AttnCallback
from .mix_token import Box, mix_tokens, unmix_tokens

__all__ = [
    "LvViT", "TrainOutput", "ConvPatchEmbed", "TokenGroupNorm", "Block", "INFERENCE_MODES",
    "TABLE4_STEMS", "checkpoint_filter_fn", "load_checkpoint_resized",
]

INFERENCE_MODES = ("cls_plus_aux", "cls")
# (layer index, head-averaged attention): a [B, N, N] tensor, or the block's lazy AttentionMap for a callback
# with `accepts_attention_map = True` (TL-Align's LabelAligner), which keeps the fused attention path.
LayerAttnCallback = Callable[[int, Union[torch.Tensor, AttentionMap]], None]


class TrainOutput(NamedTuple):
    """What :meth:`LvViT.forward_train` returns."""

    cls_logits: torch.Tensor  # [B, num_classes], class-token prediction
    token_logits: Optional[torch.Tensor]  # [B, N, num_classes] aux-head predictions, un-mixed; None without aux head
    mix_box: Optional[Box]  # the MixToken box that was applied, or None
    attn: Optional[List[torch.Tensor]] = None  # per layer [B, 1 + N, 1 + N] head-averaged, if return_attn


class TokenGroupNorm(nn.GroupNorm):
    """GroupNorm on tokens [B, N, C], channels C (LV-ViT Table 9): group statistics span all N tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvPatchEmbed(nn.Module):
    """Image [B, C_in, H, W] -> tokens [B, Gh * Gw, embed_dim] by conv-BN-ReLU layers and a projection conv.

    kernels/strides list every conv (LV-ViT Table 4); all but the last have `stem_chs` filters, padding
    k // 2, no bias, BatchNorm and ReLU; the last is the "patchify" projection to `embed_dim` (with bias).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            kernels: Sequence[int] = (7, 3, 3, 8),
            strides: Sequence[int] = (2, 1, 1, 8),
            stem_chs: int = 64,
            in_chans: int = 3,
            embed_dim: int = 384,
    ) -> None:
        super().__init__()
        if len(kernels) != len(strides) or not kernels:
            raise ValueError(f"need one stride per kernel, got kernels {kernels} and strides {strides}")
        layers, chs = [], in_chans
        for k, s in zip(kernels[:-1], strides[:-1]):
            layers.append(ConvNormAct(chs, stem_chs, k, stride=s))
            chs = stem_chs
        self.stem = nn.Sequential(*layers)  # empty for DeiT's single-conv embedding
        # Padding (k - s) // 2 keeps the grid at input / total stride also for Table 4's overlapping
        # projections (kernel 8, stride 4: 56 -> 14 rather than 13); kernel = stride gets none.
        k, s = kernels[-1], strides[-1]
        self.proj = nn.Conv2d(chs, embed_dim, kernel_size=k, stride=s, padding=max(k - s, 0) // 2)

        self.img_size = to_2tuple(img_size)
        convs = [layer.conv for layer in self.stem] + [self.proj]
        self.grid_size = tuple(_conv_out_size(s, convs) for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


def _conv_out_size(size: int, convs: Sequence[nn.Conv2d]) -> int:
    """Spatial size after a chain of (square-kernel) convs."""
    for conv in convs:
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    return size


class Block(nn.Module):
    """Pre-norm transformer block with residual scaling: x + drop_path(F(norm(x))) / skip_lam (LV-ViT Table 5)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            skip_lam: float = 1.,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, attn_callback: Optional[AttnCallback] = None) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]."""
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_callback)) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class LvViT(nn.Module):
    """ViT with conv-stem patch embedding, residual scaling and a dense aux head (defaults: LV-ViT-S).

    Args:
        img_size: input resolution; fixes the token grid and the pos-embed length.
        in_chans: input channels.
        num_classes: classes of `head` and `aux_head` (0: no heads, forward returns features).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        skip_lam: residual scaling divisor (1 = plain residual).
        stem_kernels, stem_strides, stem_chs: patch embedding, see :class:`ConvPatchEmbed`.
        norm_groups: None for LayerNorm in the blocks, else GroupNorm over tokens with this many groups.
        norm_eps: epsilon of every norm in the transformer (original LV-ViT 1e-5, timm's DeiT 1e-6).
        aux_head: add the Linear token classifier used by token labeling.
        inference_mode: "cls_plus_aux" (cls + 0.5 * max over tokens of aux, the original's eval) or "cls".
        drop_rate: dropout before `head`; pos_drop_rate, proj_drop_rate, attn_drop_rate: dropouts;
        drop_path_rate: stochastic depth, linearly increasing over blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 384,
            depth: int = 16,
            num_heads: int = 6,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            skip_lam: float = 2.,
            stem_kernels: Sequence[int] = (7, 3, 3, 8),
            stem_strides: Sequence[int] = (2, 1, 1, 8),
            stem_chs: int = 64,
            norm_groups: Optional[int] = None,
            norm_eps: float = 1e-5,
            aux_head: bool = True,
            inference_mode: str = "cls_plus_aux",
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.has_aux_head = aux_head
        self.inference_mode = inference_mode

        self.patch_embed = ConvPatchEmbed(img_size, stem_kernels, stem_strides, stem_chs, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        if norm_groups is None:
            block_norm = partial(nn.LayerNorm, eps=norm_eps)
        else:
            block_norm = partial(TokenGroupNorm, norm_groups, eps=norm_eps)
        # Plain Python instead of torch.linspace(...).item(): the model must also build on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, skip_lam=skip_lam,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=block_norm,
            )
            for i in range(depth)])
        # The paper swaps the norm "in the transformer block" only; the final norm stays LayerNorm.
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.aux_head = self._make_heads(num_classes)

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_linear)

    def _make_heads(self, num_classes: int) -> Tuple[nn.Module, Optional[nn.Module]]:
        """(head, aux_head) for `num_classes`; aux_head is None without aux head or classes."""
        if num_classes <= 0:
            return nn.Identity(), None
        head = nn.Linear(self.embed_dim, num_classes)
        aux = nn.Linear(self.embed_dim, num_classes) if self.has_aux_head else None
        return head, aux

    @property
    def inference_mode(self) -> str:
        """How forward() turns features into logits: "cls_plus_aux" or "cls" (settable at run time)."""
        return self._inference_mode

    @inference_mode.setter
    def inference_mode(self, mode: str) -> None:
        if mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {mode!r}")
        self._inference_mode = mode

    @property
    def token_grid(self) -> Tuple[int, int]:
        """(Gh, Gw): the patch-token grid at the model's img_size."""
        return self.patch_embed.grid_size

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New randomly initialised `head` (and `aux_head`, if the model has one) for `num_classes`."""
        if global_pool not in (None, "token"):
            raise ValueError(f"LvViT classifies the class token; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.head, self.aux_head = self._make_heads(num_classes)
        for module in (self.head, self.aux_head):
            if module is not None:
                module.to(self.pos_embed).apply(_init_linear)  # same device and dtype as the trunk

    def _transformer(
            self,
            tokens: torch.Tensor,
            attn_callback: Optional[LayerAttnCallback] = None,
            attn_store: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Patch tokens [B, N, C] -> normed features [B, 1 + N, C] (class token first); per block, the
        attention goes to `attn_callback` and its head-averaged map is appended to `attn_store`."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        report = attn_callback is not None or attn_store is not None
        for i, block in enumerate(self.blocks):
            x = block(x, _LayerReport(i, attn_callback, attn_store) if report else None)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, attn_callback: Optional[LayerAttnCallback] = None) -> torch.Tensor:
        """Image [B, 3, H, W] -> features [B, 1 + N, C]; attn_callback(layer, attn [B, 1+N, 1+N]) per block
        (see `forward_train`)."""
        return self._transformer(self.patch_embed(x), attn_callback)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features [B, 1 + N, C] -> logits [B, num_classes] per `inference_mode` (or class-token features)."""
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        logits = self.head(cls)
        if self.aux_head is not None and self.inference_mode == "cls_plus_aux":
            # The original's evaluation: add half the strongest token vote per class (TokenLabeling repo).
            logits = logits + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).max(dim=1).values
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] -> inference logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def forward_train(
            self,
            x: torch.Tensor,
            mix_box: Optional[Box] = None,
            attn_callback: Optional[LayerAttnCallback] = None,
            return_attn: bool = False,
    ) -> TrainOutput:
        """Training forward: class logits, un-mixed token logits, optional MixToken and attention maps.

        mix_box: MixToken box (y0, y1, x0, x1) on the token grid, or None. Tokens inside it come from
            x.flip(0) (after patch embedding, before cls token and pos-embed) and the token logits inside
            it are swapped back, so token_logits[b, i] always refers to image b's content at position i.
        attn_callback: called as fn(layer_idx, attn) in layer order. attn is the detached head-averaged
            softmax attention [B, 1 + N, 1 + N] (the layers then take the explicit softmax(QK^T) path, which
            computes it anyway), or, for a callback with ``accepts_attention_map = True`` (TL-Align's
            ``LabelAligner``), the block's lazy ``AttentionMap``: the attention stays fused and the callback
            computes only the products with the map that it needs.
        return_attn: also return the maps [B, 1 + N, 1 + N] as a list in `TrainOutput.attn`.
        """
        grid = self.token_grid
        tokens = self.patch_embed(x)
        if mix_box is not None:
            tokens = mix_tokens(tokens, mix_box, grid)

        attn_maps: Optional[List[torch.Tensor]] = [] if return_attn else None
        x = self._transformer(tokens, attn_callback, attn_maps)

        cls_logits = self.head(self.head_drop(x[:, 0]))
        token_logits = None
        if self.aux_head is not None:
            token_logits = self.aux_head(x[:, self.num_prefix_tokens:])
            if mix_box is not None:
                token_logits = unmix_tokens(token_logits, mix_box, grid)
        return TrainOutput(cls_logits, token_logits, mix_box, attn_maps)


class _LayerReport:
    """Block `layer`'s attention callback (an AttnCallback): hands the block's AttentionMap to `callback`,
    as is if the callback accepts one, else as the dense [B, N, N] map, and appends the dense map to `store`.

    `needs_dense_map` tells the layer to take the explicit softmax(QK^T) path, whose softmax the dense map
    then reuses; a callback that takes the AttentionMap alone leaves the fused kernel on.
    """

    def __init__(self, layer: int, callback: Optional[LayerAttnCallback], store: Optional[List[torch.Tensor]]) -> None:
        self.layer, self.callback, self.store = layer, callback, store
        self.lazy = callback is not None and bool(getattr(callback, "accepts_attention_map", False))
        self.needs_dense_map = store is not None or (callback is not None and not self.lazy)

    def __call__(self, attn: AttentionMap) -> None:
        dense = attn.mean() if self.needs_dense_map else None
        if self.store is not None:
            self.store.append(dense)
        if self.callback is not None:
            self.callback(self.layer, attn if self.lazy else dense)


def _init_linear(module: nn.Module) -> None:
    """ViT init of the original code: truncated normal (std .02) Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_AUTHORS_STEM = re.compile(r"^patch_embed\.(conv|bn)(\d+)\.")  # TokenLabeling's names of the stem's layers


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: LvViT,
        old_grid: Optional[Tuple[int, int]] = None,
) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: resample the pos-embed grid, keep the model's heads where they do not fit.

    - pos_embed: the class-token position is kept as is, the patch grid (square unless `old_grid` is
      given) is resampled bicubically to model.token_grid, as in LV-ViT's 384 px fine-tuning;
    - head / aux_head: the checkpoint's when the shapes match, otherwise (other class count, head
      absent on either side) the model's own freshly initialised ones, so loading stays strict.
    - the authors' stem keys (TokenLabeling's `patch_embed.conv{i}` / `patch_embed.bn{i}`) become this
      model's `patch_embed.stem.{i-1}.conv` / `.bn`: the same layers, so their released files load as they are.
    Also unwraps {"state_dict_ema": ...} (preferred, as timm's loader does) / {"model": ...} / {"state_dict": ...}
    and a DistributedDataParallel "module." prefix.
    """
    for key in ("state_dict_ema", "model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    target = model.state_dict()
    is_head = lambda k: k.startswith(("head.", "aux_head."))  # noqa: E731
    out = {}
    for k, v in state_dict.items():
        k = _AUTHORS_STEM.sub(lambda m: f"patch_embed.stem.{int(m.group(2)) - 1}.{m.group(1)}.", k.removeprefix("module."))
        if k == "pos_embed" and v.shape != target[k].shape:
            # antialias=False: plain bicubic like the original's resize (matters only when downsampling).
            v = resample_abs_pos_embed(
                v, new_size=list(model.token_grid), old_size=old_grid, num_prefix_tokens=model.num_prefix_tokens,
                interpolation="bicubic", antialias=False)
        elif is_head(k) and (k not in target or v.shape != target[k].shape):
            continue
        out[k] = v
    for k, v in target.items():
        if is_head(k) and k not in out:
            out[k] = v
    return out


def load_checkpoint_resized(
        model: LvViT,
        state_dict: Dict[str, torch.Tensor],
        old_grid: Optional[Tuple[int, int]] = None,
):
    """Load a checkpoint taken at another resolution and/or class count into `model` (strict otherwise)."""
    return model.load_state_dict(checkpoint_filter_fn(state_dict, model, old_grid=old_grid), strict=True)


# Table 4 patch embeddings at 224 px (total stride 16): row -> (kernels, strides).
TABLE4_STEMS: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    1: ((16,), (16,)),
    2: ((7, 8), (2, 8)),
    3: ((7, 3, 8), (2, 2, 4)),
    4: ((7, 3, 8), (2, 1, 8)),
    5: ((7, 3, 3, 8), (2, 1, 1, 8)),  # LV-ViT's stem
    6: ((7, 3, 3, 8), (2, 2, 1, 4)),
    7: ((7, 3, 3, 3, 3, 8), (2, 1, 1, 1, 1, 8)),
}


def embedded_stem(row: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Table 4 row at total stride 8 (for 64 px -> 8x8 tokens): the projection's kernel = stride is halved."""
    kernels, strides = TABLE4_STEMS[row]
    return kernels[:-1] + (kernels[-1] // 2,), strides[:-1] + (strides[-1] // 2,)


def _cfg(first_conv: str = "patch_embed.stem.0.conv", **kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv, "classifier": ("head", "aux_head"),
        **kwargs,
    }


def _embedded_cfg(first_conv: str = "patch_embed.stem.0.conv", **kwargs) -> Dict[str, Any]:
    # 64 px canvases, 10 classes, evaluated uncropped. The data pipeline sets its own mean/std.
    return _cfg(first_conv, num_classes=10, input_size=(3, 64, 64), crop_pct=1.0, **kwargs)


default_cfgs = generate_default_cfgs({
    "lvvit_t": _cfg(),
    "lvvit_s": _cfg(),
    "lvvit_m": _cfg(crop_pct=1.0),
    "lvvit_l": _cfg(input_size=(3, 288, 288), crop_pct=1.0),  # Table 8: LV-ViT-L is trained/tested at 288 px
    "lvvit_e": _embedded_cfg(),
    **{f"lvvit_e_pe{row}": _embedded_cfg("patch_embed.proj" if row == 1 else "patch_embed.stem.0.conv")
       for row in TABLE4_STEMS},
})


def _create_lvvit(variant: str, pretrained: bool = False, **kwargs) -> LvViT:
    """Build any LvViT-class variant; pretrained weights come from a file via pretrained_cfg_overlay."""
    return build_model_with_cfg(LvViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _stem_args(row: int, embedded: bool = False) -> Dict[str, Any]:
    kernels, strides = embedded_stem(row) if embedded else TABLE4_STEMS[row]
    return dict(stem_kernels=kernels, stem_strides=strides)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LvViT:
    """LV-ViT-T (Table 8): 12 blocks, dim 240, 4 heads, 8.5M params."""
    model_args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3., skip_lam=1.)
    return _create_lvvit("lvvit_t", pretrained, **dict(model_args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LvViT:
    """LV-ViT-S (Table 8): 16 blocks, dim 384, 6 heads, 26M params."""
    model_args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3., skip_lam=2.)
    return _create_lvvit("lvvit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LvViT:
    """LV-ViT-M (Table 8): 20 blocks, dim 512, 8 heads, 56M params."""
    model_args = dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3., skip_lam=2.)
    return _create_lvvit("lvvit_m", pretrained, **dict(model_args, **kwargs))


@register_model
def lvvit_l(pretrained: bool = False, **kwargs) -> LvViT:
    """LV-ViT-L (Table 8): 24 blocks, dim 768, 12 heads, 128-channel stem, 150M params, 288 px."""
    model_args = dict(embed_dim=768, depth=24, num_heads=12, mlp_ratio=3., skip_lam=3., stem_chs=128)
    return _create_lvvit("lvvit_l", pretrained, **dict(model_args, **kwargs))


# Embedded scale (64 px, 10 classes, 2 CPU cores): dim 72 rather than 64 so that GroupNorm with
# 1, 2, 3 and 6 groups (Table 9) divides it; 16 stem channels; total stride 8 -> 8x8 tokens.
EMBEDDED_ARGS = dict(embed_dim=72, num_heads=2, stem_chs=16)


@register_model
def lvvit_e(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded LV-ViT-S analog: 4 blocks, dim 72, MLP 3, skip_lam 2, stem [7,3,3,4]/[2,1,1,4], 8x8 tokens."""
    model_args = dict(EMBEDDED_ARGS, depth=4, mlp_ratio=3., skip_lam=2., **_stem_args(5, embedded=True))
    return _create_lvvit("lvvit_e", pretrained, **dict(model_args, **kwargs))


def _lvvit_e_table4(row: int, pretrained: bool, **kwargs) -> LvViT:
    # Table 4's baseline predates residual scaling (Table 5 row 1 repeats its 82.2), hence skip_lam 1.
    model_args = dict(EMBEDDED_ARGS, depth=4, mlp_ratio=3., skip_lam=1., **_stem_args(row, embedded=True))
    return _create_lvvit(f"lvvit_e_pe{row}", pretrained, **dict(model_args, **kwargs))


@register_model
def lvvit_e_pe1(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 1: single conv [8]/[8]."""
    return _lvvit_e_table4(1, pretrained, **kwargs)


@register_model
def lvvit_e_pe2(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 2: [7,4]/[2,4]."""
    return _lvvit_e_table4(2, pretrained, **kwargs)


@register_model
def lvvit_e_pe3(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 3: [7,3,4]/[2,2,2]."""
    return _lvvit_e_table4(3, pretrained, **kwargs)


@register_model
def lvvit_e_pe4(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 4: [7,3,4]/[2,1,4]."""
    return _lvvit_e_table4(4, pretrained, **kwargs)


@register_model
def lvvit_e_pe5(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 5 (LV-ViT's stem): [7,3,3,4]/[2,1,1,4]."""
    return _lvvit_e_table4(5, pretrained, **kwargs)


@register_model
def lvvit_e_pe6(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 6: [7,3,3,4]/[2,2,1,2]."""
    return _lvvit_e_table4(6, pretrained, **kwargs)


@register_model
def lvvit_e_pe7(pretrained: bool = False, **kwargs) -> LvViT:
    """Embedded Table 4 row 7: [7,3,3,3,3,4]/[2,1,1,1,1,4]."""
    return _lvvit_e_table4(7, pretrained, **kwargs)
