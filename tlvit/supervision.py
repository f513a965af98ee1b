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
from tlvit.labels.score_maps import topk_label_maps, topk_logit_maps
from tlvit.losses import ClassTokenLoss, TokenLabelingLoss, smooth
from tlvit.mixing import KINDS as MIX_KINDS
from tlvit.mixing import mix_images, mix_targets, mix_token_targets
from tlvit.models.mix_token import BOX_SAMPLERS, sample_token_box
from tlvit.tl_align import SMOOTHING_SLOTS
from tlvit.tl_align import VARIANTS as ALIGN_VARIANTS
from tlvit.tl_align import LabelAligner, initial_label_factors
from tlvit.tl_align_pyramid import PyramidLabelAligner

KINDS = ("ce", "relabel", "token_labeling")
POOLINGS = ("logits", "probs")
CROP_BOXES = ("exact", "transposed")


def needs_score_maps(kind: str, cls_target: str = "label") -> bool:
    """Whether a supervision reads the annotator's score maps."""
    return kind != "ce" or cls_target == "annotator"


@dataclass
class Supervision:
    kind: str
    num_classes: int
    token_grid: tuple[int, int]
    label_smoothing: float = 0.1
    token_weight: float = 0.5
    cls_target: str = "label"  # label | annotator
    absent_classes: str = "zero_logit"  # zero_logit (the original's fill) | zero_prob (softmax over the stored top-k)
    pooling: str = "logits"  # logits (the original: pool, then softmax) | probs (pool probabilities)
    crop_box: str = "exact"  # exact | transposed (the original's (top, left, bottom, right) read as (x1, y1, x2, y2))
    mix: str = "none"  # image-level mixing with the flipped batch (tlvit.mixing.KINDS)
    mix_alpha: float = 1.0
    switch_prob: float = 0.5  # mixup_cutmix[_patch]: the share of CutMix batches (DeiT 0.5; TransMix's recipe 0.8)
    mix_token: bool = False  # MixToken (LV-ViT Sec. 3.3): token box swapped after patch embedding
    align: str = "none"  # TL-Align variant (tlvit.tl_align.VARIANTS) or none
    align_layers: tuple[int, ...] = ()  # 0-based blocks for align="layers"
    align_target: str = "cls"  # cls (DeiT: the aligned class-token label) | mean_tokens (pooling models)
    align_smoothing: str = "every_slot"  # every_slot (the original) | class_slot (token slots one-hot)
    box_sampler: str = "authors"  # CutMix/MixToken box sampler (tlvit.models.mix_token.BOX_SAMPLERS)
    pyramid: bool = False  # the model is hierarchical (Swin): labels follow its windows and merging

    @classmethod
    def from_config(cls, cfg: dict, num_classes: int, token_grid: tuple[int, int], pyramid: bool = False) -> "Supervision":
        """The supervision a resolved run config describes (its `supervision` and `augment` sections); `pyramid`:
        the model is a hierarchical one (its `label_target` is mean_tokens), whose labels TL-Align moves with
        `tlvit.tl_align_pyramid`."""
        sup, aug = cfg["supervision"], cfg["augment"]
        if sup.get("targets") == "oracle" and (sup["absent_classes"], sup["pooling"]) != ("zero_prob", "probs"):
            # the oracle store holds class ids with no logits (all 0): pooled as logits they would be uniform
            raise ValueError("supervision.targets: oracle reads ground-truth class maps, not logits: set "
                             "supervision.absent_classes: zero_prob and supervision.pooling: probs for this row")
        return cls(sup["kind"], num_classes, tuple(token_grid), cfg["label_smoothing"], sup["token_weight"],
                   sup["cls_target"], sup["absent_classes"], sup["pooling"], sup["crop_box"], mix=aug["mix"],
                   mix_alpha=aug["mix_alpha"], switch_prob=aug.get("switch_prob", 0.5), mix_token=aug["mix_token"], align=sup["align"],
                   align_layers=tuple(sup["align_layers"]), align_target=sup["align_target"],
                   align_smoothing=sup["align_smoothing"], box_sampler=aug["box_sampler"], pyramid=pyramid)

    def __post_init__(self):
        checks = {"kind": (self.kind, KINDS), "cls_target": (self.cls_target, ("label", "annotator")),
                  "mix": (self.mix, MIX_KINDS), "align": (self.align, ("none",) + ALIGN_VARIANTS),
                  "align_target": (self.align_target, ("cls", "mean_tokens")),
                  "absent_classes": (self.absent_classes, ("zero_logit", "zero_prob")),
                  "pooling": (self.pooling, POOLINGS), "crop_box": (self.crop_box, CROP_BOXES),
                  "align_smoothing": (self.align_smoothing, SMOOTHING_SLOTS),
                  "box_sampler": (self.box_sampler, BOX_SAMPLERS)}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"supervision/augment {name} must be one of {allowed}, not {value!r}")
        if self.pyramid and self.align != "none" and self.align_target != "mean_tokens":
            raise ValueError("TL-Align on a pooling model (Swin) trains against its output tokens' mean label: set "
                             "supervision.align_target: mean_tokens for this row")
        self.loss = TokenLabelingLoss(self.token_weight) if self.kind == "token_labeling" else ClassTokenLoss()

    @property
    def needs_score_maps(self) -> bool:
        return needs_score_maps(self.kind, self.cls_target)

    @property
    def dense(self) -> bool:
        return self.kind == "token_labeling"

    def targets(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cls target [B, C], token targets [B, N, C] or None), built on `device`."""
        label = F.one_hot(batch["label"].to(device), self.num_classes).float()
        if not self.needs_score_maps:
            return smooth(label, self.label_smoothing), None
        logits, classes = batch["topk_logits"].to(device), batch["topk_classes"].to(device)
        if self.pooling == "logits":
            maps = topk_logit_maps(logits, classes, self.num_classes, self.absent_classes)
        else:
            maps = topk_label_maps(logits, classes, self.num_classes, self.absent_classes)
        theta = batch["theta"].to(device)
        clips = batch["clips"].to(device) if "clips" in batch else None
        if self.crop_box == "transposed":
            theta, clips = _transpose(theta), None if clips is None else _transpose(clips)
        cells, pooled = resample_label_maps(maps, theta, self.token_grid, clips=clips)
        if self.pooling == "logits":  # pooled logits -> distributions
            cells, pooled = cells.softmax(1), pooled.softmax(-1)
        use_pooled = self.kind == "relabel" or self.cls_target == "annotator"
        cls = smooth(pooled if use_pooled else label, self.label_smoothing)
        if not self.dense:
            return cls, None
        tokens = smooth(cells.flatten(2).transpose(1, 2), self.label_smoothing)  # [B, Gh*Gw, C]
        return cls, tokens

    def mix_batch(self, x: torch.Tensor, labels: torch.Tensor, cls_target: torch.Tensor, token_target: torch.Tensor | None,
                  generator: torch.Generator) -> tuple:
        """Apply the row's mixing to a batch: (images, cls target, token targets, MixToken box, aligner).

        Image mixing (CutMix, MixUp, ...) mixes the class target by the area share and each token's
        target by the share of its pixels from each image. MixToken mixes the class target by its
        token box; token targets need nothing (the model swaps those outputs back). With TL-Align the
        returned `LabelAligner` is the model's attn_callback and gives the class target afterwards
        (`aligned_target`).
        """
        box = aligner = None
        if self.mix != "none" or self.align != "none":
            mixed = mix_images(x, self.mix, self.token_grid, generator, self.mix_alpha, sampler=self.box_sampler,
                               switch_prob=self.switch_prob)
            x = mixed.images
            cls_target = mix_targets(cls_target, mixed.lam)
            if token_target is not None:
                token_target = mix_token_targets(token_target, mixed.token_own.to(x.device))
            if self.align != "none":
                one_hot = F.one_hot(labels, self.num_classes).float()
                labels0 = initial_label_factors(one_hot, mixed, self.label_smoothing, self.align_smoothing)
                # TransMix's attention-weighted label is smoothed once: already, when every slot carries it
                last_smoothing = self.label_smoothing if self.align_smoothing == "class_slot" else 0.0
                if self.pyramid:
                    aligner = PyramidLabelAligner(labels0, self.token_grid, self.align, self.align_layers or None)
                else:
                    aligner = LabelAligner(labels0, self.align, self.align_layers or None, smoothing=last_smoothing)
        if self.mix_token:
            box, lam = sample_token_box(self.token_grid, generator, sampler=self.box_sampler)
            cls_target = lam * cls_target + (1 - lam) * cls_target.flip(0)
        return x, cls_target, token_target, box, aligner

    def aligned_target(self, aligner: LabelAligner) -> torch.Tensor:
        """TL-Align's class target after the forward pass propagated the labels."""
        return aligner.cls_target() if self.align_target == "cls" else aligner.mean_token_target()

    def __call__(self, out, cls_target: torch.Tensor, token_target: torch.Tensor | None) -> torch.Tensor:
        return self.loss(out.cls_logits, cls_target, out.token_logits, token_target)


def _transpose(theta: torch.Tensor) -> torch.Tensor:
    """theta [..., 2, 3] with x and y exchanged on both sides (P A P, P t; P swaps the axes).

    For a crop (diagonal A) this is the original code's transposed box: the map is sampled over the
    crop's vertical range along x and its horizontal range along y (`supervision.crop_box: transposed`).
    """
    return theta[..., [1, 0], :][..., [1, 0, 2]]
