"""Losses and targets against small hand-computed tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from tlvit.labels.geometry import crop_flip_theta
from tlvit.losses import TokenLabelingLoss, smooth, soft_cross_entropy
from tlvit.models.lvvit import TrainOutput
from tlvit.supervision import Supervision


def test_soft_cross_entropy_matches_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    target = torch.tensor([[0.5, 0.5]])
    assert torch.isclose(soft_cross_entropy(logits, target), torch.tensor(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75))))


def test_token_labeling_loss_weights_the_dense_term():
    cls = torch.zeros(2, 4)
    tokens = torch.zeros(2, 3, 4)
    t_cls = F.one_hot(torch.tensor([0, 1]), 4).float()
    t_tok = F.one_hot(torch.tensor([[0, 1, 2], [3, 3, 3]]), 4).float()
    ln4 = math.log(4)
    assert torch.isclose(TokenLabelingLoss(0.5)(cls, t_cls, tokens, t_tok), torch.tensor(ln4 * 1.5))
    assert torch.isclose(TokenLabelingLoss(1.0)(cls, t_cls, tokens, t_tok), torch.tensor(ln4 * 2.0))


PROBS = {"absent_classes": "zero_prob", "pooling": "probs"}  # k=1 maps with logit 0: class maps, not logits


def batch_with_map(num_classes=4):
    """Two 2x2-grid score maps (k=1): image 0 is class 0 left / 1 right; image 1 all class 3."""
    classes = torch.tensor([[[[0, 1], [0, 1]]], [[[3, 3], [3, 3]]]])
    return {
        "label": torch.tensor([0, 3]),
        "topk_logits": torch.zeros(2, 1, 2, 2),
        "topk_classes": classes,
        "theta": torch.stack([crop_flip_theta((0, 0, 8, 4), (8, 8), False),  # left half of image 0
                              crop_flip_theta((0, 0, 8, 8), (8, 8), False)]).float(),
    }


def test_relabel_target_is_the_crops_pooled_map():
    sup = Supervision("relabel", 4, (2, 2), label_smoothing=0.0, **PROBS)
    cls, tok = sup.targets(batch_with_map(), torch.device("cpu"))
    assert tok is None
    assert torch.allclose(cls, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))  # left half = all class 0


def test_transposed_crop_box_is_the_originals_bug():
    """The original's (top, left, bottom, right) box read as (x1, y1, x2, y2): the left half's box samples the
    map's top half, half class 0 and half class 1 (crop_box: transposed, a deviation switch for measuring it)."""
    sup = Supervision("relabel", 4, (2, 2), label_smoothing=0.0, crop_box="transposed", **PROBS)
    cls, _ = sup.targets(batch_with_map(), torch.device("cpu"))
    assert torch.allclose(cls, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0, 1.0]]))
    b = batch_with_map()
    b["theta"][0] = crop_flip_theta((0, 0, 4, 8), (8, 8), False)  # top half: transposed, it reads the left half
    cls, _ = sup.targets(b, torch.device("cpu"))
    assert torch.allclose(cls[0], torch.tensor([1.0, 0, 0, 0]))


def test_oracle_targets_refuse_logit_pooling():
    from tlvit.config import load_params, resolve_run_config

    cfg = resolve_run_config(load_params("params.yaml"), "lvvit_s_relabel", preset="smoke")
    cfg["supervision"]["targets"] = "oracle"
    with pytest.raises(ValueError, match="absent_classes: zero_prob and supervision.pooling: probs"):
        Supervision.from_config(cfg, 10, (8, 8))
    cfg["supervision"].update(PROBS)
    assert Supervision.from_config(cfg, 10, (8, 8)).pooling == "probs"


def test_token_labeling_targets_follow_the_crop_and_keep_the_image_label_on_cls():
    sup = Supervision("token_labeling", 4, (2, 2), label_smoothing=0.1, **PROBS)
    b = batch_with_map()
    b["theta"][0] = crop_flip_theta((0, 2, 8, 4), (8, 8), False)  # the centre: half class 0, half class 1
    cls, tok = sup.targets(b, torch.device("cpu"))
    assert torch.allclose(cls[0], smooth(torch.tensor([1.0, 0, 0, 0]), 0.1))
    assert tok.shape == (2, 4, 4)
    # token grid 2x2 over the centre crop: left column is class 0, right column class 1
    assert tok[0, 0].argmax() == 0 and tok[0, 1].argmax() == 1 and tok[0, 2].argmax() == 0
    assert torch.allclose(tok.sum(-1), torch.ones(2, 4))
    orig = Supervision("token_labeling", 4, (2, 2), label_smoothing=0.0, cls_target="annotator", **PROBS)
    cls_o, _ = orig.targets(b, torch.device("cpu"))
    assert torch.allclose(cls_o[0], torch.tensor([0.5, 0.5, 0, 0]))  # the original code: pooled annotator label


def test_ce_needs_no_score_maps():
    sup = Supervision("ce", 4, (2, 2), label_smoothing=0.0)
    cls, tok = sup.targets({"label": torch.tensor([2])}, torch.device("cpu"))
    assert tok is None and torch.equal(cls, torch.tensor([[0.0, 0, 1, 0]]))
    out = TrainOutput(torch.zeros(1, 4), None, None, None)
    assert torch.isclose(sup(out, cls, None), torch.tensor(math.log(4)))
