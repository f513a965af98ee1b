"""Factored TL-Align (coefficients over (y, y.flip(0), 1/C), lazy AttentionMap) against the full-label reference.

`ReferenceAligner` is the propagation as it was before the factorisation: dense labels [B, T, C], the
explicit head-averaged map of every block, Y <- (A Y + Y) / 2. It lives only here, as the reference.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import tlvit.models  # noqa: F401  (registers deit_e)
from tlvit.losses import smooth, soft_cross_entropy
from tlvit.mixing import KINDS, Mixed, mix_images
from tlvit.models import attention as attention_module
from tlvit.models.attention import AttentionMap, explicit_apply, sdpa_apply
from tlvit.tl_align import VARIANTS, FactoredLabels, LabelAligner, initial_label_factors, initial_labels


class ReferenceAligner:
    """The dense propagation (tlvit.tl_align before the factorisation), fed explicit [B, T, T] maps."""

    def __init__(self, labels, variant="all", layers=None, smoothing=0.0):
        self.variant, self.layers, self.smoothing = variant, frozenset(layers or ()), smoothing
        self.labels = labels.detach().double().clone()
        self.area_target = self.labels[:, 0].clone()
        self.history, self.transmix = [], None

    def __call__(self, layer, attn):
        a = attn.detach().double()
        if self.variant == "last":
            w = a[:, 0, 1:]
            w = w / w.sum(-1, keepdim=True)
            attn_label = torch.bmm(w[:, None], self.labels[:, 1:])[:, 0]
            self.transmix = 0.5 * self.area_target + 0.5 * smooth(attn_label, self.smoothing)
            self.history.append(self.transmix)
            return
        if self.variant != "layers" or layer in self.layers:
            aligned = a @ self.labels
            self.labels = aligned if self.variant == "no_norm" else (aligned + self.labels) / 2
        self.history.append(self.labels[:, 0].clone())

    def cls_target(self):
        if self.variant == "last":
            return self.area_target if self.transmix is None else self.transmix
        return self.labels[:, 0]

    def mean_token_target(self):
        return self.labels[:, 1:].mean(1)

    def token_targets(self):
        return self.labels[:, 1:]


@pytest.fixture(scope="module")
def deit64(deit):
    """The same model in float64: the maps then agree across attention paths to ~1e-15, and what is left
    of a difference between the factored and the dense propagation is the aligner's float32 label maths."""
    return copy.deepcopy(deit).double()


def _set_fused(model, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


def _labels(soft: bool, b: int = 6, c: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if soft:
        return torch.softmax(2 * torch.randn(b, c, generator=g), dim=-1)
    return F.one_hot(torch.randperm(c, generator=g)[:b], c).float()


def _mixed(kind: str, grid, seed: int = 3) -> Mixed:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return mix_images(x, kind, grid, torch.Generator().manual_seed(seed), block_min_patches=2)


def _reference_run(model, x, labels, variant, layers, smoothing):
    _set_fused(model, True)
    maps = model.forward_train(x, return_attn=True).attn  # explicit path: the exact maps, in order
    ref = ReferenceAligner(labels, variant, layers, smoothing)
    for i, a in enumerate(maps):
        ref(i, a)
    return ref


def _assert_same(al: LabelAligner, ref: ReferenceAligner, atol: float = 2e-6) -> None:
    kw = dict(rtol=0, atol=atol)
    torch.testing.assert_close(al.cls_target().double(), ref.cls_target(), **kw)
    torch.testing.assert_close(al.token_targets().double(), ref.token_targets(), **kw)
    torch.testing.assert_close(al.mean_token_target().double(), ref.mean_token_target(), **kw)
    assert len(al.history) == len(ref.history)
    for h, r in zip(al.history, ref.history):
        torch.testing.assert_close(h.double(), r, **kw)
    torch.testing.assert_close(al.labels[:, 1:].double(), ref.token_targets(), **kw)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", KINDS)
def test_factors_are_the_initial_labels(kind, smoothing, soft):
    y = _labels(soft)
    mixed = _mixed(kind, (4, 4))
    f = initial_label_factors(y, mixed, smoothing)
    assert f.coeffs.shape == (6, 17, 3) and f.basis.shape == (6, 3, 10) and f.shape == (6, 17, 10)
    torch.testing.assert_close(f.dense(), initial_labels(y, mixed, smoothing), rtol=0, atol=1e-6)
    torch.testing.assert_close(f.coeffs.sum(-1), torch.ones(6, 17), rtol=0, atol=1e-6)  # every row is a distribution


def test_factors_take_a_per_sample_mask():
    y = _labels(soft=True)
    own = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    mixed = Mixed(torch.zeros(6, 3, 32, 32), 0.6, own, None, "cutmix")
    torch.testing.assert_close(initial_label_factors(y, mixed, 0.1).dense(), initial_labels(y, mixed, 0.1),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_factored_propagation_equals_the_dense_reference(deit64, variant, kind, smoothing, soft):
    """Every variant x every mixing kind x smoothing x soft labels: the fused model + factored labels give the
    reference's targets, history and labels (the reference: explicit maps, dense labels, float64)."""
    y = _labels(soft)
    mixed = _mixed(kind, deit64.token_grid)
    x = mixed.images.double()
    layers = [1] if variant == "layers" else None
    ref = _reference_run(deit64, x, initial_labels(y, mixed, smoothing), variant, layers, smoothing)

    al = LabelAligner(initial_label_factors(y, mixed, smoothing), variant, layers, smoothing=smoothing)
    deit64.forward_train(x, attn_callback=al)  # fused path: the aligner reads lazy AttentionMaps
    _assert_same(al, ref)
    torch.testing.assert_close(al.rmse_per_layer().double(),
                               torch.stack([(h - ref.area_target).pow(2).mean().sqrt() for h in ref.history]),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_model_matches_the_reference(deit, variant):
    """In float32 the map that the aligner forms next to the fused kernel differs from the explicit path's
    by float32 rounding of the (sharpened, large) logits: the targets agree to ~1e-5."""
    y, mixed = _labels(True), _mixed("cutmix_patch", deit.token_grid)
    layers = [1] if variant == "layers" else None
    ref = _reference_run(deit, mixed.images, initial_labels(y, mixed, 0.1), variant, layers, 0.1)
    al = LabelAligner(initial_label_factors(y, mixed, 0.1), variant, layers, smoothing=0.1)
    deit.forward_train(mixed.images, attn_callback=al)
    _assert_same(al, ref, atol=5e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_labels_through_the_fused_path_equal_the_reference(deit64, variant):
    y, mixed = _labels(True), _mixed("cutmix", deit64.token_grid)
    layers = [0, 2] if variant == "layers" else None
    ref = _reference_run(deit64, mixed.images.double(), initial_labels(y, mixed, 0.1), variant, layers, 0.1)
    al = LabelAligner(initial_labels(y, mixed, 0.1), variant, layers, smoothing=0.1)
    deit64.forward_train(mixed.images.double(), attn_callback=al)
    _assert_same(al, ref)


@pytest.mark.parametrize("first", ["cls", "tokens", "history"])
def test_reading_order_does_not_matter(deit64, first):
    """After the last block the class row is computed alone; reading tokens later applies the whole map."""
    y, mixed = _labels(False), _mixed("cutmix_patch", deit64.token_grid)
    ref = _reference_run(deit64, mixed.images.double(), initial_labels(y, mixed, 0.1), "all", None, 0.1)
    al = LabelAligner(initial_label_factors(y, mixed, 0.1))
    deit64.forward_train(mixed.images.double(), attn_callback=al)
    {"cls": al.cls_target, "tokens": al.token_targets, "history": lambda: al.history}[first]()
    _assert_same(al, ref)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_and_explicit_attention_give_the_same_targets(request, variant, precision):
    """fused_attn on (the aligner forms its products next to the fused kernel) or off (it reuses the explicit
    softmax): the same targets, to float rounding of the logits (float32: ~1e-6 on these sharpened maps)."""
    model = request.getfixturevalue("deit64" if precision == "float64" else "deit")
    y, mixed = _labels(True), _mixed("cutmix_patch", model.token_grid)
    x = mixed.images.to(model.pos_embed.dtype)
    layers = [1] if variant == "layers" else None
    out = {}
    for fused in (True, False):
        _set_fused(model, fused)
        al = LabelAligner(initial_label_factors(y, mixed, 0.1), variant, layers, smoothing=0.1)
        model.forward_train(x, attn_callback=al)
        out[fused] = (al.cls_target(), al.token_targets(), torch.stack(al.history))
    _set_fused(model, True)
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if precision == "float64" else 1e-5)


def test_aligner_keeps_the_fused_kernel_and_its_backward(deit, monkeypatch):
    """With the aligner, every block still runs F.scaled_dot_product_attention for its output, and the
    model's gradients are exactly those of the same step without the aligner (stop-gradient, Eq. 12)."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _set_fused(deit, True)
    y, mixed = _labels(False), _mixed("cutmix_patch", deit.token_grid)
    target = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), -1)
    grads = []
    for with_aligner in (False, True):
        calls.clear()
        al = LabelAligner(initial_label_factors(y, mixed, 0.1)) if with_aligner else None
        out = deit.forward_train(mixed.images, attn_callback=al)
        soft_cross_entropy(out.cls_logits, target).backward()
        grads.append([p.grad.clone() for p in deit.parameters() if p.grad is not None])
        deit.zero_grad()
        if with_aligner:
            t = al.cls_target()
            assert not t.requires_grad and t.grad_fn is None and not al.token_targets().requires_grad
            assert t.dtype == torch.float32
        assert len(calls) == len(deit.blocks)  # on the CPU the labels' product does not go through SDPA
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_training_through_the_target_leaves_no_graph_in_labels(deit):
    deit.train()
    try:
        y, mixed = _labels(False), _mixed("cutmix_patch", deit.token_grid)
        al = LabelAligner(initial_label_factors(y, mixed, 0.1))
        out = deit.forward_train(mixed.images, attn_callback=al)
        target = al.cls_target()
        assert not target.requires_grad and target.grad_fn is None
        soft_cross_entropy(out.cls_logits, target).backward()
        assert deit.head.weight.grad is not None
    finally:
        deit.zero_grad()
        deit.eval()


def test_labels_stay_float32_under_autocast(deit):
    y, mixed = _labels(True), _mixed("cutmix_patch", deit.token_grid)
    full = LabelAligner(initial_label_factors(y, mixed, 0.1))
    deit.forward_train(mixed.images, attn_callback=full)
    al = LabelAligner(initial_label_factors(y, mixed, 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        deit.forward_train(mixed.images, attn_callback=al)
        target, tokens = al.cls_target(), al.token_targets()  # read inside autocast, as the engine does
    assert target.dtype == tokens.dtype == torch.float32
    torch.testing.assert_close(target.sum(-1), torch.ones(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens.sum(-1), torch.ones(6, 16), rtol=0, atol=1e-5)
    assert (target - full.cls_target()).abs().max() < 0.05  # bf16 attention, float32 labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_map_products(dtype):
    g = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(2, 3, 7, 4, generator=g, dtype=dtype) for _ in range(2))
    v = torch.rand(2, 7, 3, generator=g)
    scale = 4 ** -0.5
    dense = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1).mean(1)  # [2, 7, 7]
    want = dense.to(v.dtype) @ v
    for probs in (None, torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)):
        amap = AttentionMap(q, k, scale, probs)
        assert amap.shape == (2, 7, 7)
        torch.testing.assert_close(amap.apply(v), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(amap @ v, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(amap.apply(v, slice(0, 1)), want[:, :1], rtol=0, atol=1e-6)
        torch.testing.assert_close(amap.mean(), dense)
    # the two ways of forming the product without the map (CPU: explicit; CUDA: SDPA with v narrower than d)
    torch.testing.assert_close(explicit_apply(q, k, scale, v), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(explicit_apply(q[:, :, :2], k, scale, v), want[:, :2], rtol=0, atol=1e-6)  # few rows
    torch.testing.assert_close(sdpa_apply(q, k, scale, v), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(sdpa_apply(q[:, :, :2], k, scale, v), want[:, :2], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_apply_on_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(4, 6, 197, 64, generator=g, device="cuda").to(dtype) for _ in range(2))
    v = torch.rand(4, 197, 3, generator=g, device="cuda")
    want = torch.softmax(q.float() @ k.float().transpose(-2, -1) / 8, dim=-1).mean(1) @ v
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(sdpa_apply(q, k, 1 / 8, v), want, rtol=0, atol=tol)


def test_factored_misuse_is_refused():
    y = _labels(False)
    mixed = _mixed("cutmix", (4, 4))
    f = initial_label_factors(y, mixed, 0.1)
    with pytest.raises(ValueError):
        LabelAligner(FactoredLabels(f.coeffs, f.basis, uniform=None), "last", smoothing=0.1)
    with pytest.raises(ValueError):
        LabelAligner(FactoredLabels(f.coeffs, f.basis[:, :2]))
    with pytest.raises(ValueError):
        initial_label_factors(y[0], mixed)
    al = LabelAligner(f)
    with pytest.raises(ValueError):
        al(0, torch.eye(5).expand(6, 5, 5))
