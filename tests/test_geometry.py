"""Label maps follow their image: crops, flips, rotations, non-square images (the original code's bugs)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from tlvit.data.datasets import EvalGeometry, TrainGeometry
from tlvit.labels.geometry import compose, crop_flip_theta, resample_label_maps, rotation_theta


def quadrant_maps(h: int, w: int) -> torch.Tensor:
    """[1, 4, h, w] one-hot maps: class 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    cls = torch.zeros(h, w, dtype=torch.long)
    cls[: h // 2, w // 2 :] = 1
    cls[h // 2 :, : w // 2] = 2
    cls[h // 2 :, w // 2 :] = 3
    return F.one_hot(cls, 4).permute(2, 0, 1)[None].double()


def test_identity_crop_keeps_the_map():
    maps = quadrant_maps(8, 8)
    theta = crop_flip_theta((0, 0, 8, 8), (8, 8), False)[None]
    cells, pooled = resample_label_maps(maps, theta, (8, 8))
    assert torch.allclose(cells, maps, atol=1e-6)
    assert torch.allclose(pooled, torch.full((1, 4), 0.25, dtype=torch.double))


def test_crop_box_is_not_transposed_on_a_non_square_image():
    # image 40 high x 80 wide; crop the top-right quadrant: rows 0..20, cols 40..80
    maps = quadrant_maps(10, 20)
    theta = crop_flip_theta((0, 40, 20, 40), (40, 80), False)[None]
    cells, pooled = resample_label_maps(maps, theta, (4, 4))
    assert pooled.argmax().item() == 1
    assert torch.allclose(cells[0, 1], torch.ones(4, 4, dtype=torch.double), atol=1e-6)
    # the transposed box (x and y swapped, the original code's pattern) would land elsewhere
    wrong = crop_flip_theta((40, 0, 40, 20), (80, 40), False)[None]
    assert resample_label_maps(maps, wrong, (4, 4))[1].argmax().item() != 1


def test_flip_moves_the_labels_with_the_image():
    maps = quadrant_maps(8, 8)
    cells, _ = resample_label_maps(maps, crop_flip_theta((0, 0, 8, 8), (8, 8), True)[None], (2, 2))
    # after a horizontal flip the top-left cell shows what was top-right (class 1)
    assert cells[0, :, 0, 0].argmax().item() == 1
    assert cells[0, :, 1, 1].argmax().item() == 2


def test_rotation_by_90_degrees_moves_quadrants():
    maps = quadrant_maps(8, 8)
    cells, _ = resample_label_maps(maps, rotation_theta(90)[None], (2, 2))
    # content rotated 90 deg counter-clockwise: the top-right quadrant (1) ends up top-left
    assert cells[0, :, 0, 0].argmax().item() == 1
    assert cells[0, :, 1, 0].argmax().item() == 0


def test_compose_applies_inner_then_outer():
    crop = crop_flip_theta((0, 0, 4, 4), (8, 8), False)  # top-left quadrant
    flip = crop_flip_theta((0, 0, 8, 8), (8, 8), True)
    cells, _ = resample_label_maps(quadrant_maps(8, 8), compose(flip, crop)[None], (1, 1))
    assert cells[0, :, 0, 0].argmax().item() == 0  # flipping a one-class crop keeps its class


def test_out_of_image_samples_carry_no_label():
    maps = quadrant_maps(8, 8)
    # a "crop" twice the image, centred: the outer ring of output cells is outside the image
    theta = torch.tensor([[[2.0, 0, 0], [0, 2.0, 0]]], dtype=torch.double)
    cells, pooled = resample_label_maps(maps, theta, (4, 4))
    assert torch.allclose(cells[0, :, 0, 0], torch.full((4,), 0.25, dtype=torch.double))  # uniform
    assert torch.allclose(cells.sum(1), torch.ones(1, 4, 4, dtype=torch.double))
    assert torch.allclose(pooled, torch.full((1, 4), 0.25, dtype=torch.double), atol=1e-6)


@pytest.mark.parametrize("order", ["crop_flip_randaug", "flip_randaug_crop"])
@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_train_geometry_theta_reproduces_the_image_transform(hflip, order):
    """Resampling the *original image* with theta must give the augmented image (non-square input)."""
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 96)) * 255).astype(np.uint8)
    arr = np.kron(arr[::8, ::8], np.ones((8, 8), np.uint8))  # blocky so bilinear/bicubic agree
    img = Image.fromarray(arr).convert("RGB")
    torch.manual_seed(3)
    geo = TrainGeometry(32, scale=(0.3, 0.6), hflip=hflip, interpolation=InterpolationMode.BILINEAR, order=order)
    out, theta, _ = geo(img)
    src = TF.to_tensor(img)[None].double()
    grid = F.affine_grid(theta[None].double(), [1, 3, 32, 32], align_corners=False)
    warped = F.grid_sample(src, grid, mode="bilinear", align_corners=False)[0]
    target = TF.to_tensor(out).double()
    assert (warped - target).abs().mean() < 0.04


def test_eval_geometry_centre_crop_region():
    img = Image.new("RGB", (80, 40))
    _, theta, _ = EvalGeometry(32, crop_pct=1.0)(img)
    # the centre 40x40 square of an 80x40 image spans x in [-0.5, 0.5] of the full image
    assert torch.allclose(theta, torch.tensor([[0.5, 0, 0], [0, 1.0, 0]]))


@pytest.mark.parametrize("order", ["crop_flip_randaug", "flip_randaug_crop"])
@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_rand_augment_geometric_ops_move_the_labels_with_the_pixels(op, order):
    """theta from RandAugment's geometric op, composed with the crop, warps the original onto the output."""
    import random

    from timm.data.auto_augment import AugmentOp, RandAugment

    from tlvit.data.rand_augment import LabelAwareRandAugment

    rng = np.random.default_rng(1)
    arr = np.kron((rng.random((6, 12)) * 255).astype(np.uint8), np.ones((8, 8), np.uint8))  # 48 x 96, blocky
    img = Image.fromarray(arr).convert("RGB")
    hp = {"translate_const": 20, "img_mean": (0, 0, 0), "interpolation": Image.NEAREST}
    ra = LabelAwareRandAugment(RandAugment([AugmentOp(op, prob=1.0, magnitude=9, hparams=hp)], num_layers=1))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    geo = TrainGeometry(48, scale=(0.5, 0.8), hflip=0.5, interpolation=InterpolationMode.NEAREST, rand_augment=ra,
                        order=order)
    out, theta, clips = geo(img)
    assert not torch.allclose(theta, crop_flip_theta((0, 0, 48, 96), (48, 96), False).float())
    grid = F.affine_grid(theta[None].double(), [1, 3, 48, 48], align_corners=False)
    warped = F.grid_sample(TF.to_tensor(img)[None].double(), grid, mode="nearest", align_corners=False)[0]
    # where RandAugment moved fill colour in, the image is 0 and the labels must be absent too
    from tlvit.labels.geometry import clip_mask

    valid = clip_mask(clips[None].double(), (48, 48))[0]
    warped = warped * valid
    target = TF.to_tensor(out).double()
    # the image went through two nearest resamplings (crop resize, then the op), the warp through one:
    # they may round differently by one pixel, so each pixel must match within its 3x3 neighbourhood
    neighbours = F.unfold(F.pad(warped[None], (1, 1, 1, 1), mode="replicate"), 3).view(3, 9, 48, 48)
    match = ((neighbours - target[:, None]).abs() < 1e-6).any(1)
    assert match.double().mean() > 0.99


def test_rand_augment_is_reproducible_from_the_seeds():
    import random

    from tlvit.data.rand_augment import build_rand_augment

    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    ra = build_rand_augment("rand-m9-mstd0.5-inc1", 32, (0.5, 0.5, 0.5))

    def run():
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        return [ra(img) for _ in range(4)]

    a, b = run(), run()
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
               for x, y in zip(a, b))


def test_clipped_regions_carry_no_label():
    """A translate that moves fill colour into the right half: those cells get no label, the rest keep theirs."""
    maps = quadrant_maps(8, 8)
    crop = crop_flip_theta((0, 0, 8, 4), (8, 8), False)  # the left half (classes 0 and 2)
    shift = torch.tensor([[1.0, 0, 1.0], [0, 1.0, 0]], dtype=torch.double)  # output x -> input x + 1 (half the width)
    theta = compose(shift, crop)[None]
    cells, _ = resample_label_maps(maps, theta, (2, 2))
    assert cells[0, :, 0, 1].argmax().item() == 1  # without clips: the map beyond the crop (class 1) leaks in
    cells, _ = resample_label_maps(maps, theta, (2, 2), clips=shift[None, None])
    assert cells[0, :, 0, 0].argmax().item() == 0  # left cell: the crop's right part, still class 0
    assert torch.allclose(cells[0, :, 0, 1], torch.full((4,), 0.25, dtype=torch.double))  # fill: uniform


def test_partly_clipped_cells_stay_distributions():
    """A clip through the middle of a cell: its clipped samples lose mass and weight alike (until 3f2c4f3
    only the weight, so such a cell, and the pooled label, summed to more than 1)."""
    maps = quadrant_maps(8, 8)
    theta = torch.eye(2, 3, dtype=torch.double)[None]
    shift = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0]], dtype=torch.double)  # clips the right quarter of the output
    cells, pooled = resample_label_maps(maps, theta, (2, 2), clips=shift[None, None])
    assert torch.allclose(cells.sum(1), torch.ones(1, 2, 2, dtype=torch.double))
    assert torch.allclose(cells[0, :, 0, 1], torch.tensor([0.0, 1, 0, 0], dtype=torch.double))  # what is left: class 1
    assert torch.allclose(pooled, torch.tensor([[1 / 3, 1 / 6, 1 / 3, 1 / 6]], dtype=torch.double))


def test_authors_order_runs_rand_augment_on_the_whole_image():
    """flip -> RandAugment -> crop translates the whole image: a small crop sees the fill or not, wherever it lies.

    Crop first, the translation is a share of the crop itself, so every crop shows the same share of fill.
    """
    import random

    from timm.data.auto_augment import AugmentOp, RandAugment

    from tlvit.data.rand_augment import LabelAwareRandAugment
    from tlvit.labels.geometry import clip_mask

    img = Image.new("RGB", (96, 48), (200, 200, 200))
    hp = {"translate_pct": 0.45, "img_mean": (0, 0, 0), "interpolation": Image.NEAREST}
    shares = {}
    for order in ("crop_flip_randaug", "flip_randaug_crop"):
        shares[order] = []
        for seed in range(12):
            ra = LabelAwareRandAugment(RandAugment([AugmentOp("TranslateXRel", prob=1.0, magnitude=9, hparams=hp)],
                                                   num_layers=1))
            torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
            geo = TrainGeometry(24, scale=(0.15, 0.15), ratio=(1.0, 1.0), hflip=0.0,
                                interpolation=InterpolationMode.NEAREST, rand_augment=ra, order=order)
            out, theta, clips = geo(img)
            fill = (np.asarray(out)[..., 0] == 0).mean()
            # the clips know where the fill is, in either order
            assert abs((1 - clip_mask(clips[None].double(), (24, 24))[0].mean().item()) - fill) < 0.05
            shares[order].append(fill)
    assert np.allclose(shares["crop_flip_randaug"], 0.4, atol=0.05)  # timm's level 9 of 10: 0.45 x 0.9
    assert max(abs(f - 0.4) for f in shares["flip_randaug_crop"]) > 0.3  # some crops all fill or none


def test_random_train_interpolation_uses_both_modes_and_colour_jitter_only_without_rand_augment():
    import random

    from tlvit.data.rand_augment import build_rand_augment

    geo = TrainGeometry(16, interpolation="random")
    random.seed(0)
    assert {geo._mode() for _ in range(20)} == {InterpolationMode.BILINEAR, InterpolationMode.BICUBIC}
    with pytest.raises(ValueError, match="train_interpolation"):
        TrainGeometry(16, interpolation="lanczos3")
    with pytest.raises(ValueError, match="transform_order"):
        TrainGeometry(16, order="randaug_first")
    img = Image.new("RGB", (32, 32), (120, 60, 30))
    torch.manual_seed(0)
    out, theta, _ = TrainGeometry(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.4)(img)
    assert np.asarray(out)[0, 0].tolist() != [120, 60, 30]  # jittered
    assert torch.allclose(theta, torch.eye(2, 3))  # colour leaves the labels alone
    with_ra = TrainGeometry(32, color_jitter=0.4, rand_augment=build_rand_augment("rand-m9-mstd0.5-inc1", 32, (0.5,) * 3))
    assert with_ra._jitter is None  # timm: colour jitter only when no auto-augment
