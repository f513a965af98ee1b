"""Every place tlvit's default differs from, or could differ from, the authors' code: one registry.

The rule: the default is the paper's method as the authors' code implements it (TokenLabeling at 9dbfd59,
TL-Align at 4da0621, relabel_imagenet at 3d4824f), except where that code contradicts the paper's own
text or is geometrically wrong; there the paper and correct geometry win. Each entry names its switch
(a dotted key of the resolved run config), the value that reproduces the original code and the value
of the other behaviour, and, when it changes training, the pair of rows (`experiments/rows.yaml`) that
measures it: the same row with only that switch flipped, so the report's deviations table gives a
paired difference over seeds. `docs/deviations.md` is rendered from here (`tlvit deviations`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Deviation", "DEVIATIONS", "render_markdown"]


@dataclass(frozen=True)
class Deviation:
    key: str
    topic: str
    original: str  # what the authors' code does
    other: str  # the other behaviour
    default: str  # "original" or "other": which one tlvit trains by default
    why: str  # why the default is what it is
    switch: str | None = None  # dotted config key; None: not switchable (a bug fix, or outside training)
    original_value: object = None
    other_value: object = None
    rows: tuple[str, str] | None = None  # (row with the original's behaviour, row with the other) for the table
    # a conflict in one ImageNet recipe (the paper's text vs the authors' command): the row whose `imagenet`
    # config carries the switch; too costly to pair here, the report lists both values and the choice
    recipe_row: str | None = None

    @property
    def changes_training(self) -> bool:
        return self.rows is not None


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "align_smoothing", "TL-Align: label smoothing of the initial labels",
        "every slot smoothed (`token_label(target, C, mask, smoothing)`): the aligned target is smooth(aligned labels)",
        "class slot smoothed, token slots one-hot: the class slot's share, and with it the smoothing, shrinks with depth",
        "original", "the paper is silent; the original's target keeps the recipe's smoothing of 0.1",
        "supervision.align_smoothing", "every_slot", "class_slot", ("deit_s_tlalign", "deit_s_tlalign_smooth_cls_slot")),
    Deviation(
        "box_sampler", "CutMix / MixToken / token CutMix box",
        "side int(G·sqrt(1-λ)), box [c - side//2, c + side//2) clipped: even sides, small boxes vanish "
        "(mixed share 0.27 of a 14x14 grid, 0.23 of 8x8)",
        "side round(G·sqrt(1-λ)), box [c - side//2, c - side//2 + side) clipped (mixed share 0.32 of either grid)",
        "original", "the paper is silent; timm's CutMix, LV-ViT's MixToken and TL-Align's token CutMix all truncate",
        "augment.box_sampler", "authors", "rounded",
        ("lvvit_s_token_labeling", "lvvit_s_token_labeling_box_rounded")),
    Deviation(
        "pooling", "Score-map pooling (ReLabel target, token labels)",
        "`roi_align` of the dense *logit* map, then softmax",
        "average of *probabilities* (each location's softmax first)",
        "original", "the paper is silent; the original pools logits. The resampling geometry is tlvit's either way "
        "(see crop_box, map_region)",
        "supervision.pooling", "logits", "probs", ("lvvit_s_relabel", "lvvit_s_relabel_pool_probs")),
    Deviation(
        "absent_classes", "Classes outside the stored top-k",
        "logit 0 in the dense map before the softmax over all classes: they leak probability",
        "probability 0 (softmax over the stored top-k only)",
        "original", "the paper is silent (it stores the top-5 logits). With `pooling: logits` the original's fill is "
        "required: absent classes have no other logit to pool",
        "supervision.absent_classes", "zero_logit", "zero_prob",
        ("lvvit_s_relabel_pool_probs", "lvvit_s_relabel_pool_probs_topk_softmax")),
    Deviation(
        "token_loss", "Token-labeling loss",
        "dense weight 1.0; class token trained on the pooled *annotator* label",
        "the paper's Eq. 7: β = 0.5; class token trained on the image label y^cls",
        "other", "the paper's text (LV-ViT Sec. 3.2, Eq. 7) contradicts the code: the paper wins",
        "supervision.token_weight, supervision.cls_target", "1.0, annotator", "0.5, label",
        ("lvvit_s_token_labeling_loss_original", "lvvit_s_token_labeling")),
    Deviation(
        "crop_box", "Crop box handed to `roi_align`",
        "built as (top, left, bottom, right) where `roi_align` expects (x1, y1, x2, y2): transposed",
        "the exact crop: each sample carries an affine `theta` and the map is resampled with it",
        "other", "geometrically wrong in the original: the exact box wins",
        "supervision.crop_box", "transposed", "exact",
        ("lvvit_s_token_labeling_box_transposed", "lvvit_s_token_labeling")),
    Deviation(
        "finetune_epochs", "LV-ViT 384 px fine-tune length",
        "the README's command sets no --epochs: main.py's 300 + 10 cool-down epochs",
        "30 epochs (LV-ViT supplementary Sec. 1)",
        "other", "the paper states 30 epochs for the fine-tune: the paper wins",
        "epochs, cooldown_epochs", "300, 10", "30, 0", recipe_row="lvvit_s_token_labeling_384"),
    Deviation(
        "lvvit_l_img_size", "LV-ViT-L training resolution",
        "224 px (README command: --img-size 224 --token-label-size 14)",
        "288 px (LV-ViT Table 8 and the 288/288 line of the resolution table)",
        "other", "the paper states 288 px for LV-ViT-L: the paper wins",
        "img_size", 224, 288, recipe_row="lvvit_l_token_labeling"),
    Deviation(
        "lvvit_l_lr", "LV-ViT-L learning rate",
        "1e-3 at batch 1024 (README command: --lr 1.e-3)",
        "the default rule 1e-3 x batch/640 = 1.6e-3 (supplementary Table 1)",
        "original", "the paper gives only defaults; the command sets LV-ViT-L's own value: the code decides",
        "lr_base_batch_token_labeling", 1024, 640, recipe_row="lvvit_l_token_labeling"),
    Deviation(
        "lvvit_l_drop_path", "LV-ViT-L stochastic depth",
        "0.3 (README command: --drop-path 0.3; M: 0.2, as the supplementary also states)",
        "the default 0.1 (supplementary Table 1)",
        "original", "the paper gives only defaults; the command sets LV-ViT-L's own value: the code decides",
        "drop_path", 0.3, 0.1, recipe_row="lvvit_l_token_labeling"),
    Deviation(
        "lvvit_l_rand_augment", "LV-ViT-L RandAugment",
        "3 ops per image (README command: --aa rand-n3-m9-mstd0.5-inc1)",
        "the default 2 ops, magnitude 9/0.5 (supplementary Table 1)",
        "original", "the paper gives only defaults; the command sets LV-ViT-L's own value: the code decides",
        "rand_augment", "rand-n3-m9-mstd0.5-inc1", "rand-m9-mstd0.5-inc1", recipe_row="lvvit_l_token_labeling"),
    Deviation(
        "map_region", "Region a score map covers",
        "the annotator sees the image resized (short side) and centre-cropped; crop boxes are fractions of the "
        "full image, so for non-square images box and map disagree",
        "the annotator sees the whole image resized to a square; the map covers exactly the image",
        "other", "geometrically wrong in the original; the embedded canvases are square, so no embedded pair "
        "can measure it"),
    Deviation(
        "label_smoothing_form", "Label smoothing of soft (score-map) targets",
        "p·(1 - ε + ε/C) + ε/C: sums to 1 + ε/C, not a distribution",
        "(1 - ε)·p + ε/C (the usual form; equal to the original's for one-hot labels)",
        "other", "a target that is not a distribution scales the loss and adds a uniform term; the paper says "
        "only 'label smoothing 0.1'"),
    Deviation(
        "align_mixup_tokens", "TL-Align with MixUp: initial token labels",
        "each token keeps its own image's label (`token_label` with no mask)",
        "every token gets λ·y + (1 - λ)·y' (the paper's Sec. 3.3: 'for MixUp, we can simply set all label "
        "embeddings' to the mixed label)",
        "other", "the paper's text contradicts the code: the paper wins"),
    Deviation(
        "map_flip", "Horizontal flip of the score map",
        "flipped with the image (TokenLabeling); not flipped (ReLabel)",
        "flipped: the flip is part of `theta`",
        "original", "TokenLabeling's behaviour, and geometrically right"),
    Deviation(
        "pvt_v2", "TL-Align Table 1's PVT rows: the network",
        "PVT v1 (PVT-T 13.2M, PVT-S 24.5M: non-overlapping patch embeddings, a class token at the last stage); the "
        "TL-Align authors released no PVT code",
        "timm's PVT-v2 at the same sizes (b1 14.0M, b2 25.4M): overlapping patch embeddings (labels summed under the "
        "kernel, normalised), a 3x3 depthwise conv in the MLP (labels pass through it, as Table 10 treats the MLP), "
        "the mean token label as the target of its mean-pooled head",
        "other", "timm has no PVT v1; TL-Align's Table 10 rules applied to v2's operations (tlvit/tl_align_pyramid.py)"),
    Deviation(
        "inference", "Inference of token-labeled models",
        "`cls + 0.5 · max_over_tokens(aux)`",
        "the same; class-token-only accuracy is logged too (`top1_cls_only`)",
        "original", "the paper's rule", "model inference_mode"),
)


def render_markdown() -> str:
    """`docs/deviations.md`: the registry as a reference table (tests/test_deviations.py keeps them equal)."""
    out = [
        "# Where tlvit differs from the authors' code, and the switch for each",
        "",
        "Generated from `tlvit/deviations.py` by `tlvit deviations --write docs/deviations.md`; do not edit by hand.",
        "",
        "The default is the paper's method as the authors' code implements it (TokenLabeling at 9dbfd59, TL-Align at",
        "4da0621, relabel_imagenet at 3d4824f), except where that code contradicts the paper's own text or is",
        "geometrically wrong; there the paper and correct geometry win. Papers: *All Tokens Matter: Token Labeling for",
        "Training Better Vision Transformers* (NeurIPS 2021, arXiv:2104.10858); *Token-Label Alignment for Vision",
        "Transformers* (ICCV 2023, arXiv:2210.06455).",
        "",
        "Each deviation that changes training has a pair of rows that differ only in its switch; the report's",
        "deviations table (`reports/<preset>/deviations.md`) gives their paired difference over seeds. Conflicts",
        "inside one ImageNet recipe (a paper's text vs the authors' command for it) name the row whose `imagenet`",
        "config carries the switch; `experiments/authors_recipes.yaml` holds every value of the authors' recipes",
        "with its source, and `tests/test_authors_recipes.py` checks each resolved ImageNet row against it.",
        "",
        "| deviation | topic | original code | other behaviour | tlvit default | why | switch (original / other) | measured by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in DEVIATIONS:
        switch = f"`{d.switch}`: `{d.original_value}` / `{d.other_value}`" if d.original_value is not None else (
            f"`{d.switch}`" if d.switch else "— (not switchable)")
        rows = (f"`{d.rows[0]}` vs `{d.rows[1]}`" if d.rows else
                f"ImageNet recipe of `{d.recipe_row}` (not paired)" if d.recipe_row else "—")
        default = "original" if d.default == "original" else "other"
        out.append(f"| `{d.key}` | {d.topic} | {d.original} | {d.other} | {default} | {d.why} | {switch} | {rows} |")
    out += [
        "",
        "## Embedded default only",
        "",
        "The embedded annotator (`annotator_cnn`) is trained here, densely (the loss on every location of its",
        "1x1-conv classifier map, each location labelled with the digit whose ink it covers) on canvases the",
        "data stage composes from the train digits apart from the student's. See `docs/annotator.md` for why,",
        "with the measured dense-label accuracy of the alternatives.",
    ]
    return "\n".join(out) + "\n"
