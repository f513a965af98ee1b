"""Resampling the stored top-k gives what resampling the dense maps gave, without building them."""
import math

import pytest
import torch
import torch.nn.functional as F

from tlvit.labels.geometry import clip_mask, compose, crop_flip_theta, resample_label_maps, rotation_theta
from tlvit.labels.score_maps import topk_label_maps
from tlvit.losses import smooth
from tlvit.supervision import Supervision


# ------------------------------------------------------------------ reference: the dense implementation (up to 3f2c4f3)
def dense_reference_topk_to_dense(logits, classes, num_classes, absent="zero_prob"):
    # the softmax in float64, then float32 as before: in float32, zero_logit's softmax over 1000 classes
    # drifts by up to 5e-5 (995 terms e^0 summed onto a large one), more than the tolerance tested here
    logits = logits.double()
    classes = classes.long()
    B, k, h, w = logits.shape
    dense = logits.new_zeros(B, num_classes, h, w)
    if absent == "zero_prob":
        return dense.scatter_(1, classes, logits.softmax(1)).float()
    return dense.scatter_(1, classes, logits).softmax(1).float()


def dense_reference_resample(maps, theta, out_hw, samples_per_cell=4, clips=None):
    B, C = maps.shape[:2]
    Gh, Gw = out_hw
    s = samples_per_cell
    grid = F.affine_grid(theta.to(maps.dtype), [B, C, Gh * s, Gw * s], align_corners=False)
    sampled = F.grid_sample(maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(maps[:, :1]), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if clips is not None:
        inside = inside * clip_mask(clips.to(maps.dtype), grid.shape[1:3])[:, None]
        # the one change: clipped samples lose their mass too, not only their weight (before, a partly
        # clipped cell summed to more than 1: tests/test_geometry.py::test_partly_clipped_cells_stay_distributions)
        sampled = sampled * inside
    cell_mass = F.avg_pool2d(sampled, s)
    cell_inside = F.avg_pool2d(inside, s)
    cells = _reference_normalise(cell_mass, cell_inside, C)
    pooled = _reference_normalise(sampled.mean((2, 3)), inside.mean((2, 3)), C)
    return cells, pooled


def _reference_normalise(mass, inside, num_classes):
    eps = 1e-6
    uniform = torch.full_like(mass, 1.0 / num_classes)
    return torch.where(inside > eps, mass / inside.clamp_min(eps), uniform)
# ------------------------------------------------------------------------------------------------------------------


def random_case(g, B, C, k, hw, image_hw=(300, 400), num_clips=None):
    """Stored top-k (distinct classes per location, fp16 logits) + thetas that crop (partly outside the
    image too), flip, rotate and shear a non-square image, + clips that cut parts of the output off."""
    h, w = hw
    logits = (torch.randn(B, k, h, w, generator=g) * 4).half()
    classes = torch.argsort(torch.rand(B, h, w, C, generator=g), -1)[..., :k].permute(0, 3, 1, 2).to(torch.int16)
    H, W = image_hw
    thetas = []
    for _ in range(B):
        r = torch.rand(6, generator=g).tolist()
        box = ((0.6 * r[0] - 0.1) * H, (0.6 * r[1] - 0.1) * W, (0.25 + 0.6 * r[2]) * H, (0.25 + 0.6 * r[3]) * W)
        theta = crop_flip_theta(box, image_hw, r[4] < 0.5)
        shear = torch.tensor([[1.0, 0.6 * (r[5] - 0.5), 0], [0, 1.0, 0]], dtype=torch.float64)
        thetas.append(compose(compose(rotation_theta(40 * (r[5] - 0.5), image_hw), shear), theta))
    clips = None
    if num_clips:
        clips = torch.stack([compose(rotation_theta(30 * (torch.rand(1, generator=g).item() - 0.5)),
                                     torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
                                     + torch.cat([torch.zeros(2, 2, dtype=torch.float64),
                                                  torch.rand(2, 1, generator=g, dtype=torch.float64) - 0.5], 1))
                             for _ in range(B * num_clips)]).view(B, num_clips, 2, 3)
    return logits, classes, torch.stack(thetas).float(), clips


CASES = [  # B, C, k, stored grid, output grid, samples per cell, clips per sample
    (4, 1000, 5, (18, 18), (14, 14), 4, 1),  # ImageNet: NFNet-F6 top-5 -> LV-ViT's 14 x 14
    (3, 1000, 1, (18, 18), (14, 14), 4, None),
    (5, 10, 3, (16, 16), (8, 8), 4, 2),  # the embedded preset
    (4, 7, 7, (5, 9), (3, 6), 2, 3),  # k = C, non-square maps and grids
    (6, 20, 4, (11, 7), (4, 4), 1, 1),
]


@pytest.mark.parametrize("absent", ["zero_prob", "zero_logit"])
@pytest.mark.parametrize("case", CASES)
def test_topk_resampling_equals_the_dense_reference(case, absent):
    B, C, k, hw, out_hw, s, num_clips = case
    g = torch.Generator().manual_seed(CASES.index(case) * 2 + (absent == "zero_logit"))
    logits, classes, theta, clips = random_case(g, B, C, k, hw, num_clips=num_clips)
    ref_cells, ref_pooled = dense_reference_resample(dense_reference_topk_to_dense(logits, classes, C, absent), theta,
                                                     out_hw, s, clips)
    cells, pooled = resample_label_maps(topk_label_maps(logits, classes, C, absent), theta, out_hw, s, clips)
    assert cells.shape == ref_cells.shape and pooled.shape == ref_pooled.shape
    assert (cells - ref_cells).abs().max() < 1e-6 and (pooled - ref_pooled).abs().max() < 1e-6
    assert torch.allclose(cells.sum(1), torch.ones(B, *out_hw), atol=1e-5)
    if num_clips:  # some samples are clipped, not all
        assert 0 < clip_mask(clips, (out_hw[0] * s, out_hw[1] * s)).mean() < 1


def test_dense_maps_take_the_same_path():
    """Dense probability maps (figures, tests) are resampled as k = C entries: same numbers as the reference."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 9, 12, generator=g, dtype=torch.float64).softmax(1)
    _, _, theta, clips = random_case(g, 3, 6, 1, (9, 12), num_clips=2)
    for c in (None, clips):
        ref = dense_reference_resample(maps, theta, (5, 7), 3, c)
        got = resample_label_maps(maps, theta, (5, 7), 3, c)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, ref))


def test_bfloat16_maps_read_the_same_locations():
    """bfloat16 probabilities (autocast on a GPU): every sample still reads the location float32 reads.
    18 x 18 = 324 locations: bfloat16 numbers them exactly only up to 256, so the geometry must not run in it."""
    g = torch.Generator().manual_seed(7)
    logits, classes, theta, clips = random_case(g, 4, 1000, 5, (18, 18), num_clips=1)
    maps = topk_label_maps(logits, classes, 1000)
    half = type(maps)(maps.probs.bfloat16(), *maps[1:])
    ref = resample_label_maps(type(maps)(half.probs.float(), *maps[1:]), theta, (14, 14), 4, clips)
    got = resample_label_maps(half, theta, (14, 14), 4, clips)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref):  # bfloat16 rounding of the sums (~2^-8 relative), not another location's label
        assert (a.float() - b).abs().max() < 1e-2


@pytest.mark.parametrize("kind", ["relabel", "token_labeling"])
@pytest.mark.parametrize("pooling,absent", [("probs", "zero_prob"), ("probs", "zero_logit"), ("logits", "zero_logit")])
def test_supervision_targets_equal_the_dense_reference(kind, pooling, absent):
    """What training sees: smoothed token targets and ReLabel's / the annotator's pooled class target.

    pooling="logits" is the original's: the dense logit map (top-k scattered into zeros) pooled, then a softmax.
    """
    C, grid = 1000, (14, 14)
    g = torch.Generator().manual_seed(1)
    logits, classes, theta, clips = random_case(g, 3, C, 5, (18, 18), num_clips=1)
    label = torch.tensor([3, 999, 0])
    sup = Supervision(kind, C, grid, label_smoothing=0.1, absent_classes=absent, pooling=pooling,
                      cls_target="annotator" if kind == "token_labeling" else "label")
    cls, tokens = sup.targets({"label": label, "topk_logits": logits, "topk_classes": classes, "theta": theta,
                               "clips": clips}, torch.device("cpu"))
    if pooling == "probs":
        dense = dense_reference_topk_to_dense(logits, classes, C, absent)
    else:
        dense = torch.zeros(3, C, 18, 18, dtype=torch.float64).scatter_(1, classes.long(), logits.double())
    ref_cells, ref_pooled = dense_reference_resample(dense, theta, grid, clips=clips)
    tol = 1e-6
    if pooling == "logits":  # float32 sums of logits up to ~16, then exp: ~1e-5 absolute
        ref_cells, ref_pooled, tol = ref_cells.softmax(1), ref_pooled.softmax(-1), 1e-4
    assert (cls - smooth(ref_pooled, 0.1)).abs().max() < tol
    if kind == "token_labeling":
        assert (tokens - smooth(ref_cells.flatten(2).transpose(1, 2), 0.1)).abs().max() < tol
    if pooling == "logits":  # pooling logits is not pooling probabilities: the two targets differ
        other = Supervision(kind, C, grid, label_smoothing=0.1, absent_classes=absent, pooling="probs",
                            cls_target=sup.cls_target)
        cls_p, _ = other.targets({"label": label, "topk_logits": logits, "topk_classes": classes, "theta": theta,
                                  "clips": clips}, torch.device("cpu"))
        assert (cls - cls_p).abs().max() > 1e-3


def test_pooling_logits_needs_a_logit_for_absent_classes():
    logits, classes, theta, clips = random_case(torch.Generator().manual_seed(4), 2, 50, 5, (6, 6), num_clips=1)
    sup = Supervision("relabel", 50, (4, 4), absent_classes="zero_prob", pooling="logits")
    batch = {"label": torch.tensor([1, 2]), "topk_logits": logits, "topk_classes": classes, "theta": theta}
    with pytest.raises(ValueError, match="absent_classes: zero_logit"):
        sup.targets(batch, torch.device("cpu"))


def test_no_tensor_is_as_large_as_the_dense_maps():
    """Memory by design: every tensor made on the way is at most the output's size, [B, C, Gh, Gw].

    The dense path made [B, C, h, w] maps (18 x 18 > 14 x 14) and sampled them at 16 points per
    token: [B, C, 56, 56], 1.6 GB at ImageNet scale and batch 128.
    """
    B, C, k, out_hw = 4, 1000, 5, (14, 14)
    logits, classes, theta, clips = random_case(torch.Generator().manual_seed(2), B, C, k, (18, 18), num_clips=1)
    sizes = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append((t.numel(), getattr(func, "__name__", str(func))))
            return out

    with Record():
        cells, _ = resample_label_maps(topk_label_maps(logits, classes, C, "zero_logit"), theta, out_hw, clips=clips)
    largest = max(sizes)
    assert largest[0] <= cells.numel() == B * C * math.prod(out_hw), largest
    assert len(sizes) > 20  # the mode saw the calls
