"""TL-Align through timm's Swin (tlvit.tl_align_pyramid): labels follow the windows, the shift, its mask and the
patch merging; checked against a float64 global-attention reference written here from the Swin paper's
definitions (not from timm's window code)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import tlvit.models  # noqa: F401  (registers swin_e)
from tlvit.mixing import mix_images
from tlvit.supervision import Supervision
from tlvit.tl_align import FactoredLabels, initial_label_factors
from tlvit.tl_align_pyramid import PyramidLabelAligner, merge_2x2


def tiny_swin(dtype=torch.float32, sharpen: float = 8.0):
    """64 px, 4x4 patches: a 16x16 grid (windows 4, shift 2), then 8x8 (still shifted); attention sharpened, so
    that labels move visibly (at init it is near-uniform within a window)."""
    torch.manual_seed(0)
    model = timm.create_model("swin_e", num_classes=10, depths=(2, 2), num_heads=(2, 4), embed_dim=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.mul_(sharpen)
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1.0)
    return model.to(dtype).eval()


def mixed_labels(model, dtype=torch.float32, kind="cutmix", seed=0, smoothing=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 64, 64, generator=g, dtype=dtype)
    mixed = mix_images(x, kind, model.token_grid, g)
    y = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).to(dtype)
    labels = initial_label_factors(y, mixed, smoothing)
    return mixed.images, FactoredLabels(labels.coeffs.to(dtype), labels.basis.to(dtype), labels.uniform)


def test_an_unmixed_image_keeps_its_one_hot_label_through_every_block():
    model = tiny_swin()
    x = torch.randn(4, 3, 64, 64)
    y = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    H, W = model.token_grid
    coeffs = torch.zeros(4, 1 + H * W, 3)
    coeffs[..., 0] = 1  # every slot: the image's own label
    al = PyramidLabelAligner(FactoredLabels(coeffs, torch.stack([y, y.flip(0), torch.full_like(y, .1)], 1)), (H, W))
    model.forward_train(x, attn_callback=al)
    assert len(al.history) == 4
    for h in al.history:
        torch.testing.assert_close(h, y)
    torch.testing.assert_close(al.mean_token_target(), y)
    torch.testing.assert_close(al.token_targets(), y[:, None].expand(-1, 64, -1))  # the last stage's 8x8 tokens


@pytest.mark.parametrize("variant", ["all", "no_norm"])
def test_label_mass_is_preserved_and_labels_move(variant):
    model = tiny_swin()
    images, labels = mixed_labels(model)
    al = PyramidLabelAligner(labels, model.token_grid, variant)
    model.forward_train(images, attn_callback=al)
    torch.testing.assert_close(al.token_targets().sum(-1), torch.ones(4, 64))
    for h in al.history:
        torch.testing.assert_close(h.sum(-1), torch.ones(4))
    assert (al.mean_token_target() - al.area_target).abs().max() > 1e-3  # sharpened attention moves the labels
    assert al.rmse_per_layer().shape == (4,)


def _block_inputs(model, block_type, images) -> dict:
    """block -> the positional arguments it was called with in one forward pass of `images` (no gradient)."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a))
             for m in model.modules() if isinstance(m, block_type)]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return inputs


def _reference_target(model, images, labels):
    """TL-Align's target through the Swin stages, float64, as one global [N, N] attention per block: token i attends
    to j iff both fall in the same window after the cyclic shift by -s; the relative position bias is indexed by
    their in-window offsets, and pairs from different regions of the shifted image get -100 (Swin's mask)."""
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

    inputs = {blk: args[0] for blk, args in _block_inputs(model, SwinTransformerBlock, images).items()}

    B, T, K = labels.coeffs.shape
    H, W = model.token_grid
    Y = labels.coeffs[:, 1:].double()  # [B, N, K] row-major
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            Y = Y.view(B, H // 2, 2, W // 2, 2, K).mean(dim=(2, 4)).reshape(B, -1, K)
            Y = Y / Y.sum(-1, keepdim=True)  # averaged, then normalised (TL-Align's Table 10)
            H, W = H // 2, W // 2
        for blk in stage.blocks:
            x = inputs[blk]  # [B, H, W, C]
            ws, s = blk.window_size[0], blk.shift_size[0]
            attn = blk.attn
            qkv = attn.qkv(blk.norm1(x).reshape(B, H * W, -1)).reshape(B, H * W, 3, attn.num_heads, -1)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, h, N, d]
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            rs, cs = (r - s) % H, (c - s) % W  # position after torch.roll(-s)
            rs, cs = rs.flatten(), cs.flatten()
            same_window = ((rs[:, None] // ws) == (rs[None] // ws)) & ((cs[:, None] // ws) == (cs[None] // ws))
            dr = (rs[:, None] % ws) - (rs[None] % ws) + ws - 1
            dc = (cs[:, None] % ws) - (cs[None] % ws) + ws - 1
            bias = attn.relative_position_bias_table[(dr * (2 * ws - 1) + dc).flatten()].view(H * W, H * W, -1)
            logits = logits + bias.permute(2, 0, 1)[None]
            if s:
                def region(p, n):
                    return (p >= n - ws).long() + (p >= n - s).long()
                reg = region(rs, H) * 3 + region(cs, W)
                logits = logits + torch.where(reg[:, None] == reg[None], 0.0, -100.0).double()
            logits = logits.masked_fill(~same_window, float("-inf"))
            A = logits.softmax(-1).mean(1)  # [B, N, N]
            Y = (A @ Y + Y) / 2
    return torch.bmm(Y.mean(1, keepdim=True), labels.basis.double())[:, 0]


def test_aligned_target_equals_a_float64_global_attention_reference():
    model = tiny_swin(torch.float64)
    images, labels = mixed_labels(model, torch.float64)
    al = PyramidLabelAligner(labels, model.token_grid)
    model.forward_train(images, attn_callback=al)
    ref = _reference_target(model, images, labels)
    assert (ref - al.area_target).abs().max() > 1e-3  # a reference that moved
    torch.testing.assert_close(al.mean_token_target(), ref, rtol=0, atol=1e-12)


def test_a_wrong_shift_is_caught_by_the_reference():
    """The reference is sensitive to the geometry: labels mixed without the cyclic shift disagree with it."""
    from timm.models.swin_transformer import SwinTransformerBlock

    model = tiny_swin(torch.float64)
    images, labels = mixed_labels(model, torch.float64)
    ref = _reference_target(model, images, labels)
    al = PyramidLabelAligner(labels, model.token_grid)
    al.window_block = (lambda block: lambda ws, ss: block(ws, (0, 0)))(al.window_block)  # forget the shift
    model.forward_train(images, attn_callback=al)
    assert any(b.shift_size != (0, 0) for b in model.modules() if isinstance(b, SwinTransformerBlock))
    assert (al.mean_token_target() - ref).abs().max() > 1e-6


def test_layers_variant_moves_labels_only_in_its_blocks():
    model = tiny_swin()
    images, labels = mixed_labels(model)
    al = PyramidLabelAligner(labels, model.token_grid, "layers", layers=(2,))
    model.forward_train(images, attn_callback=al)
    h = al.history
    torch.testing.assert_close(h[0], al.area_target)  # blocks 0, 1: labels untouched
    torch.testing.assert_close(h[1], al.area_target)
    assert (h[2] - h[1]).abs().max() > 1e-4
    torch.testing.assert_close(h[3], h[2])


def test_merging_averages_2x2_and_normalises_padded_cells():
    labels = torch.zeros(1, 3, 3, 2)
    labels[..., 0] = 1.0
    labels[0, 0, 1] = torch.tensor([0.0, 1.0])
    out = merge_2x2(labels)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(out[0, 1, 1], torch.tensor([1.0, 0.0]))  # one real cell, three zero pads


def test_refusals_name_the_fix():
    model = tiny_swin()
    images, labels = mixed_labels(model)
    with pytest.raises(ValueError, match="class token"):
        PyramidLabelAligner(labels, model.token_grid, "last")
    with pytest.raises(ValueError, match="token grid"):
        PyramidLabelAligner(labels, (8, 8))
    with pytest.raises(ValueError, match="align_target: mean_tokens"):
        Supervision("ce", 10, model.token_grid, mix="cutmix_patch", align="all", pyramid=True)
    with pytest.raises(ValueError, match="token labeling"):
        timm.create_model("swin_e", num_classes=10, aux_head=True)


def test_supervision_trains_swin_against_its_aligned_mean_label():
    """One training step's targets on swin_e: Supervision builds the pyramid aligner, the forward pass moves it."""
    model = timm.create_model("swin_e", num_classes=10)
    sup = Supervision("ce", 10, model.token_grid, mix="cutmix_patch", align="all", align_target="mean_tokens",
                      pyramid=True)
    x, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    cls, tokens = sup.targets({"label": labels}, torch.device("cpu"))
    images, cls, tokens, box, aligner = sup.mix_batch(x, labels, cls, tokens, torch.Generator().manual_seed(1))
    assert isinstance(aligner, PyramidLabelAligner)
    out = model.forward_train(images, attn_callback=aligner)
    target = sup.aligned_target(aligner)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    loss = sup(out, target, None)
    loss.backward()
    assert model.head.fc.weight.grad is not None


def test_timm_swin_weights_load_into_the_tlvit_swin():
    """Same modules and names as timm's Swin-T: timm's state dict loads strictly and gives the same logits."""
    ref = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=112, window_size=7).eval()
    ours = timm.create_model("tlvit_swin_tiny_patch4_window7_224", num_classes=10, img_size=112, window_size=7).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.forward_train(x).cls_logits, ref(x))


# ---------------------------------------------------------------- PVT-v2 (spatial-reduction attention)
def tiny_pvt(dtype=torch.float32, sharpen: float = 6.0, linear: bool = False):
    """64 px: 16x16 -> 8x8 -> 4x4 tokens; spatial reduction 4 / 2 / 1 (or the linear variant's 7x7 pooling)."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_e", num_classes=10, depths=(1, 1, 1), embed_dims=(16, 32, 48), num_heads=(1, 2, 3),
                              sr_ratios=(4, 2, 1), linear=linear)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.q.weight", "attn.kv.weight")):
                p.mul_(sharpen)
    return model.to(dtype).eval()


def _sum_normalise(x):
    return x / x.sum(-1, keepdim=True)


def _pvt_reference_target(model, images, labels):
    """TL-Align's target through PVT-v2 in float64, written from the definitions: the keys' labels are the sums of the
    R x R token labels their conv reads (or the 7x7 average pooling's cells), normalised; a stage's 3x3 stride-2
    patch embedding sums the labels under its kernel (zero padding outside), normalised; per block Y <- (A Y_k + Y)/2."""
    from timm.models import pvt_v2

    inputs = _block_inputs(model, pvt_v2.Block, images)
    B, _, K = labels.coeffs.shape
    H, W = model.token_grid
    Y = labels.coeffs[:, 1:].double().reshape(B, H, W, K)
    for stage in model.stages:
        if stage.downsample is not None:
            padded = F.pad(Y, (0, 0, 1, 1, 1, 1))
            Ho, Wo = (H + 1) // 2, (W + 1) // 2
            Y = _sum_normalise(sum(padded[:, di:di + 2 * Ho:2, dj:dj + 2 * Wo:2] for di in range(3) for dj in range(3)))
            H, W = Ho, Wo
        for blk in stage.blocks:
            x, _ = inputs[blk]
            a = blk.attn
            h = blk.norm1(x)
            q = a.q(h).reshape(B, H * W, a.num_heads, -1).transpose(1, 2)
            if a.pool is not None:
                r = a.act(a.norm(a.sr(a.pool(h.transpose(1, 2).reshape(B, -1, H, W))).flatten(2).transpose(1, 2)))
                Yk = _sum_normalise(F.adaptive_avg_pool2d(Y.permute(0, 3, 1, 2), 7).permute(0, 2, 3, 1))
            elif a.sr is not None:
                R = a.sr.stride[0]
                r = a.norm(a.sr(h.transpose(1, 2).reshape(B, -1, H, W)).flatten(2).transpose(1, 2))
                Yk = _sum_normalise(Y.reshape(B, H // R, R, W // R, R, K).sum(dim=(2, 4)))
            else:
                r, Yk = h, Y
            k = a.kv(r).reshape(B, -1, 2, a.num_heads, a.head_dim)[:, :, 0].transpose(1, 2)
            A = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)  # [B, N, M]
            Y = (A @ Yk.reshape(B, -1, K) + Y.reshape(B, -1, K)).reshape(B, H, W, K) / 2
    return torch.bmm(Y.reshape(B, -1, K).mean(1, keepdim=True), labels.basis.double())[:, 0]


@pytest.mark.parametrize("linear", [False, True])
def test_pvt_aligned_target_equals_a_float64_reference(linear):
    model = tiny_pvt(torch.float64, linear=linear)
    images, labels = mixed_labels(model, torch.float64)
    al = PyramidLabelAligner(labels, model.token_grid)
    model.forward_train(images, attn_callback=al)
    ref = _pvt_reference_target(model, images, labels)
    assert (ref - al.area_target).abs().max() > 1e-3
    torch.testing.assert_close(al.mean_token_target(), ref, rtol=0, atol=1e-12)
    assert len(al.history) == 3 and al.token_targets().shape == (4, 16, 10)


def test_pvt_keeps_an_unmixed_label_and_the_label_mass():
    model = tiny_pvt()
    H, W = model.token_grid
    y = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    coeffs = torch.zeros(4, 1 + H * W, 3)
    coeffs[..., 0] = 1
    al = PyramidLabelAligner(FactoredLabels(coeffs, torch.stack([y, y.flip(0), torch.full_like(y, .1)], 1)), (H, W))
    model.forward_train(torch.randn(4, 3, 64, 64), attn_callback=al)
    torch.testing.assert_close(al.mean_token_target(), y)
    images, labels = mixed_labels(model)
    al = PyramidLabelAligner(labels, model.token_grid)
    model.forward_train(images, attn_callback=al)
    torch.testing.assert_close(al.token_targets().sum(-1), torch.ones(4, 16))


def test_timm_pvt_weights_load_into_the_tlvit_pvt():
    ref = timm.create_model("pvt_v2_b0", num_classes=10).eval()
    ours = timm.create_model("tlvit_pvt_v2_b1", num_classes=10, embed_dims=(32, 64, 160, 256)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_train(x).cls_logits, ref(x))


def test_the_rmse_figure_aligns_a_swin_through_its_windows():
    """Fig. 3's per-block RMSE on a Swin model: the report's aligner is the pyramid one, one value per block."""
    from tlvit.report.alignment import FIGURE_MODELS, RMSE_ROWS, _align

    assert "Swin-T" in RMSE_ROWS and "swin_e".startswith(FIGURE_MODELS)
    model = tiny_swin()
    x, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 5])
    _, initial, aligner = _align(model, x, labels, 10, seed=0)
    assert isinstance(aligner, PyramidLabelAligner)
    rmse = aligner.rmse_per_layer()
    assert rmse.shape == (4,) and torch.isfinite(rmse).all() and rmse[-1] > 0


@pytest.mark.parametrize("make", [tiny_swin, tiny_pvt])
def test_labels_keep_float32_under_the_models_autocast(make):
    """Training on a GPU runs the forward pass (and so the hooks) under bf16 autocast; the label maths must not be
    cast: mass stays 1 to float32 precision and the target equals the float32 forward's (up to the attention's
    own bf16 rounding, which moves labels far less than bf16 label products would)."""
    model = make()
    images, labels = mixed_labels(model)
    al = PyramidLabelAligner(labels, model.token_grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_train(images, attn_callback=al)
    assert al.token_targets().dtype == torch.float32
    torch.testing.assert_close(al.token_targets().sum(-1), torch.ones(al.token_targets().shape[:2]), rtol=0, atol=2e-6)
