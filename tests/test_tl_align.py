"""TL-Align label propagation against hand-computed tensors and a real tiny DeiT."""
import pytest
import torch
import torch.nn.functional as F

import tlvit.models  # noqa: F401  (registers deit_e)
from tlvit.losses import soft_cross_entropy
from tlvit.mixing import Mixed, mix_images
from tlvit.losses import smooth
from tlvit.tl_align import VARIANTS, LabelAligner, initial_labels


def two_image_mix() -> tuple[torch.Tensor, Mixed]:
    """Images of class 0 and 1 (C = 3) on a 2x2 grid; the last token comes from the partner, lam = 3/4."""
    y = F.one_hot(torch.tensor([0, 1]), 3).float()
    mixed = Mixed(torch.zeros(2, 3, 4, 4), 0.75, torch.tensor([1.0, 1.0, 1.0, 0.0]), (2, 4, 2, 4), "cutmix_patch")
    return y, mixed


def test_initial_labels_by_hand():
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed, smoothing=0.3)
    assert lab.shape == (2, 5, 3)
    # class slot: smoothed area mix; token slots: the smoothed label of the source image (the original's token_label)
    assert torch.allclose(lab[0, 0], torch.tensor([0.75, 0.25, 0]) * 0.7 + 0.1)
    assert torch.allclose(lab[1, 0], torch.tensor([0.25, 0.75, 0]) * 0.7 + 0.1)
    assert torch.allclose(lab[0, 1:], torch.tensor([[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.8, 0.1]]))
    assert torch.allclose(lab[1, 1:], torch.tensor([[0.1, 0.8, 0.1]] * 3 + [[0.8, 0.1, 0.1]]))
    # the class_slot switch: token slots one-hot of the source image, not smoothed
    old = initial_labels(y, mixed, smoothing=0.3, slots="class_slot")
    assert torch.equal(old[:, 0], lab[:, 0])
    assert torch.equal(old[0, 1:], torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]]))
    assert torch.equal(old[1, 1:], torch.tensor([[0, 1.0, 0]] * 3 + [[1.0, 0, 0]]))
    # a patch cut by a pixel box gets the share within the patch
    cut = Mixed(mixed.images, 0.9, torch.tensor([1.0, 1.0, 1.0, 0.6]), None, "cutmix")
    assert torch.allclose(initial_labels(y, cut)[0, 4], torch.tensor([0.6, 0.4, 0]))


@pytest.mark.parametrize("blocks", [1, 3, 12])
def test_unmixed_target_is_the_smoothed_label_after_any_depth(blocks):
    """With label smoothing eps every slot is smooth(y) for an unmixed image, so any attention keeps it (the
    original code's target); smoothing only the class slot let the one-hot tokens wash the smoothing out."""
    from tlvit.tl_align import initial_label_factors

    y = F.one_hot(torch.tensor([2, 0, 1]), 3).float()
    unmixed = Mixed(torch.zeros(3, 3, 4, 4), 1.0, torch.ones(4), None, "none")
    for labels in (initial_labels(y, unmixed, 0.1), initial_label_factors(y, unmixed, 0.1)):
        al = LabelAligner(labels)
        for i in range(blocks):
            al(i, random_attention(torch.Generator().manual_seed(i), 3, 5))
        torch.testing.assert_close(al.cls_target(), smooth(y, 0.1))
    old = LabelAligner(initial_label_factors(y, unmixed, 0.1, slots="class_slot"))
    for i in range(blocks):
        old(i, random_attention(torch.Generator().manual_seed(i), 3, 5))
    assert not torch.allclose(old.cls_target(), smooth(y, 0.1), atol=1e-3)  # the effective smoothing fell


@pytest.mark.parametrize("kind", ["cutmix_patch", "cutmix", "mixup"])
def test_mixed_target_is_the_smoothed_unsmoothed_alignment(kind):
    """smooth(aligned labels computed with eps = 0) is the aligned target with eps, for every mixing kind."""
    from tlvit.tl_align import initial_label_factors

    y = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    mixed = mix_images(torch.randn(4, 3, 8, 8), kind, (2, 2), torch.Generator().manual_seed(3))
    plain, smoothed = LabelAligner(initial_label_factors(y, mixed, 0.0)), LabelAligner(initial_label_factors(y, mixed, 0.1))
    for i in range(4):
        attn = random_attention(torch.Generator().manual_seed(10 + i), 4, 5)
        plain(i, attn)
        smoothed(i, attn)
    torch.testing.assert_close(smoothed.cls_target(), smooth(plain.cls_target(), 0.1))
    torch.testing.assert_close(smoothed.token_targets(), smooth(plain.token_targets(), 0.1))


def test_identity_attention_leaves_labels_unchanged():
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed, 0.1)
    for variant in ("all", "no_norm"):
        al = LabelAligner(lab, variant)
        for i in range(3):
            al(i, torch.eye(5).expand(2, 5, 5))
        assert torch.equal(al.labels, lab)
        assert torch.equal(al.cls_target(), lab[:, 0])
        assert torch.allclose(al.rmse_per_layer(), torch.zeros(3))


def copy_attention(j: int, b: int = 2, t: int = 5) -> torch.Tensor:
    """Identity attention except that the class token attends only to token j."""
    a = torch.eye(t).repeat(b, 1, 1)
    a[:, 0] = F.one_hot(torch.tensor(j), t).float()
    return a


def test_copying_attention_averages_cls_with_that_token():
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed, 0.0)
    al = LabelAligner(lab)
    al(0, copy_attention(4))  # token 4 = slot of the partner's patch
    # (A Y + Y) / 2 for the class row = (y_token4 + y_cls) / 2
    assert torch.allclose(al.cls_target(), torch.tensor([[0.375, 0.625, 0], [0.625, 0.375, 0]]))
    assert torch.equal(al.token_targets(), lab[:, 1:])  # identity rows: tokens keep their labels
    al(1, copy_attention(1))  # then attend to own token 1: ((0.375, .625) + (1, 0)) / 2
    assert torch.allclose(al.cls_target()[0], torch.tensor([0.6875, 0.3125, 0]))
    assert len(al.history) == 2 and torch.allclose(al.history[0][0], torch.tensor([0.375, 0.625, 0]))

    no_norm = LabelAligner(lab, "no_norm")
    no_norm(0, copy_attention(4))  # Y <- A Y: the class label becomes token 4's label
    assert torch.equal(no_norm.cls_target(), lab[:, 4])


def random_attention(gen: torch.Generator, b: int = 2, t: int = 5, sharp: float = 3.0) -> torch.Tensor:
    return torch.softmax(sharp * torch.randn(b, t, t, generator=gen), dim=-1)


@pytest.mark.parametrize("variant", ["all", "no_norm", "layers", "last"])
def test_mass_is_preserved(variant):
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed, 0.1)
    al = LabelAligner(lab, variant, layers=(0, 2) if variant == "layers" else None, smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        al(i, random_attention(g))
    assert torch.allclose(al.labels.sum(-1), torch.ones(2, 5))
    for target in (al.cls_target(), al.mean_token_target()):
        assert torch.allclose(target.sum(-1), torch.ones(2)) and (target >= 0).all()


def test_layers_variant_only_moves_labels_in_listed_blocks():
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed, 0.0)
    al, ref = LabelAligner(lab, "layers", layers=[1]), LabelAligner(lab)
    g = torch.Generator().manual_seed(1)
    maps = [random_attention(g) for _ in range(3)]
    al(0, maps[0])
    assert torch.equal(al.labels, lab)
    al(1, maps[1])
    ref(0, maps[1])
    assert torch.allclose(al.labels, ref.labels)
    al(2, maps[2])
    assert torch.allclose(al.labels, ref.labels)
    assert torch.equal(al.history[0], lab[:, 0])


def test_last_is_transmix():
    # TransMix: lam = (lam_area + lam_attn) / 2, lam_attn = class attention on own patches / all patches
    y, mixed = two_image_mix()
    g = torch.Generator().manual_seed(2)
    first, last = random_attention(g), random_attention(g)
    w = last[:, 0, 1:]
    lam_attn = (w * mixed.token_own).sum(-1) / w.sum(-1)  # [B]
    lam = ((0.75 + lam_attn) / 2)[:, None]
    want = smooth(lam * y + (1 - lam) * y.flip(0), 0.1)
    # smoothed token slots already smooth the weighted label; one-hot ones leave it to the aligner
    for slots, smoothing in (("every_slot", 0.0), ("class_slot", 0.1)):
        al = LabelAligner(initial_labels(y, mixed, 0.1, slots), "last", smoothing=smoothing)
        al(0, first)
        al(1, last)
        assert torch.allclose(al.cls_target(), want)
    lab = initial_labels(y, mixed, 0.1, "class_slot")
    al = LabelAligner(lab, "last", smoothing=0.1)
    al(0, first)
    al(1, last)
    assert torch.equal(al.token_targets(), lab[:, 1:])  # TransMix moves no token label
    assert not torch.allclose(al.history[0], al.history[1])  # each block's target is recorded
    assert torch.equal(LabelAligner(lab, "last").cls_target(), lab[:, 0])  # before any block: the area target


def test_mixup_labels_are_invariant_to_attention():
    # MixUp gives every slot the same label (smoothing 0), and row-stochastic mixing cannot change it.
    y = F.one_hot(torch.tensor([0, 1]), 3).float()
    m = mix_images(torch.randn(2, 3, 4, 4), "mixup", (2, 2), torch.Generator().manual_seed(0))
    al = LabelAligner(initial_labels(y, m))
    al(0, random_attention(torch.Generator().manual_seed(3)))
    assert torch.allclose(al.cls_target(), m.lam * y + (1 - m.lam) * y.flip(0))


def test_targets_carry_no_gradient():
    y, mixed = two_image_mix()
    al = LabelAligner(initial_labels(y, mixed, 0.1))
    attn = random_attention(torch.Generator().manual_seed(4)).requires_grad_()
    al(0, attn)
    assert not al.cls_target().requires_grad and not al.token_targets().requires_grad


def test_misuse_is_refused():
    y, mixed = two_image_mix()
    lab = initial_labels(y, mixed)
    with pytest.raises(ValueError):
        LabelAligner(lab, "layers")
    with pytest.raises(ValueError):
        LabelAligner(lab, "all", layers=[1])
    with pytest.raises(ValueError):
        LabelAligner(lab, "bogus")
    al = LabelAligner(lab)
    al(0, torch.eye(5).expand(2, 5, 5))
    with pytest.raises(RuntimeError):
        al(0, torch.eye(5).expand(2, 5, 5))  # a reused aligner
    with pytest.raises(ValueError):
        al(1, torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_propagation_through_a_real_deit(deit, variant):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()  # partners b and 3 - b have different classes
    mixed = mix_images(x, "cutmix_patch", deit.token_grid, torch.Generator().manual_seed(8))
    assert 0 < mixed.lam < 1
    lab = initial_labels(y, mixed, smoothing=0.0)
    al = LabelAligner(lab, variant, layers=[1] if variant == "layers" else None)
    out = deit.forward_train(mixed.images, attn_callback=al, return_attn=True)

    assert len(al.history) == len(deit.blocks) == len(out.attn)
    target = al.cls_target()
    assert target.shape == (4, 10) and not target.requires_grad
    assert torch.allclose(target.sum(-1), torch.ones(4))
    assert torch.allclose(al.mean_token_target().sum(-1), torch.ones(4))
    own_share = target[torch.arange(4), torch.arange(4)]
    assert (own_share - mixed.lam).abs().max() > 1e-3  # non-uniform attention moves the target off the area lam
    assert torch.allclose(target[torch.arange(4), torch.arange(4).flip(0)], 1 - own_share, atol=1e-6)

    if variant == "all":  # the callback saw the same maps, in order, as a by-hand propagation
        ref = lab.clone()
        for a in out.attn:
            ref = (a @ ref + ref) / 2
        assert torch.allclose(al.labels, ref, atol=1e-6)
        assert al.rmse_per_layer().shape == (3,) and (al.rmse_per_layer() > 0).all()

    loss = soft_cross_entropy(out.cls_logits, target)  # trains against the target, no gradient through it
    loss.backward()
    assert deit.head.weight.grad is not None
    deit.zero_grad()
