"""Image mixing with the flipped batch: exact lam, patch alignment, token shares, determinism."""
import pytest
import torch

from tlvit.mixing import KINDS, mix_images, mix_targets, mix_token_targets
from tlvit.models.mix_token import sample_token_box, token_box_mask

GRID = (4, 4)  # 16 tokens of 4x4 pixels on a 16x16 image


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labelled_batch(b: int = 4, size: int = 16) -> torch.Tensor:
    """Image i is the constant i + 1 (all channels), so every mixed pixel tells which image it came from."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, size, size).clone()


def own_pixels(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool: pixel comes from the sample's own image (needs labelled_batch with even B)."""
    return (images == x)[:, 0]


@pytest.mark.parametrize("kind", ["cutmix", "cutmix_patch", "patch", "block"])
def test_pixel_masks_agree_with_lam_and_token_own(kind):
    x = labelled_batch()
    for seed in range(6):
        m = mix_images(x, kind, GRID, gen(seed))
        own = own_pixels(x, m.images)
        assert torch.all(own | (m.images == x.flip(0))[:, 0])  # every pixel is own or the partner's
        assert torch.equal(own, own[:1].expand_as(own))  # one mask per batch
        assert m.lam == pytest.approx(own[0].float().mean().item(), abs=1e-12)
        # a token's own share = share of its 4x4 pixels that are own; they average to lam
        by_hand = own[0].float().view(4, 4, 4, 4).mean(dim=(1, 3)).flatten()
        assert torch.allclose(m.token_own, by_hand)
        assert m.token_own.mean().item() == pytest.approx(m.lam, abs=1e-6)


def test_cutmix_lam_is_the_exact_box_area_and_tokens_can_be_cut():
    x = labelled_batch(size=16)
    fractional = False
    for seed in range(20):
        m = mix_images(x, "cutmix", GRID, gen(seed))
        y0, y1, x0, x1 = m.box
        assert m.lam == 1 - (y1 - y0) * (x1 - x0) / 256  # exact, no float rounding slack
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(own_pixels(x, m.images)[0], ~inside)
        fractional |= bool(((m.token_own > 0) & (m.token_own < 1)).any())
    assert fractional  # pixel boxes do cut patches: token labels are then fractional (TL-Align Sec. 3.3)


def test_patch_aligned_cutmix_covers_whole_patches_only():
    x = labelled_batch()
    for seed in range(20):
        m = mix_images(x, "cutmix_patch", GRID, gen(seed))
        assert all(c % 4 == 0 for c in m.box)
        assert set(m.token_own.unique().tolist()) <= {0.0, 1.0}
        tb = tuple(c // 4 for c in m.box)
        assert torch.equal(m.token_own.bool(), ~token_box_mask(GRID, tb).flatten())
        assert m.token_own.sum().item() == pytest.approx(m.lam * 16, abs=1e-9)


@pytest.mark.parametrize("kind", ["patch", "block"])
def test_patch_and_block_swap_whole_patches(kind):
    x = labelled_batch()
    lams = set()
    for seed in range(10):
        m = mix_images(x, kind, GRID, gen(seed))
        assert m.box is None
        assert set(m.token_own.unique().tolist()) <= {0.0, 1.0}
        assert m.lam == pytest.approx(m.token_own.mean().item(), abs=1e-9)
        lams.add(m.lam)
    assert len(lams) > 3  # lam ~ Beta(1, 1), not a constant


def test_block_mask_is_made_of_rectangles():
    # On a 8x8 grid a block mix swaps connected groups of patches, not scattered single patches.
    x = labelled_batch(size=32)
    m = mix_images(x, "block", (8, 8), gen(3), block_min_patches=4)
    swap = (m.token_own == 0).view(8, 8)
    assert swap.any()
    padded = torch.nn.functional.pad(swap, (1, 1, 1, 1))
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert torch.all(neighbours[swap])  # every swapped patch touches another (blocks have >= 2 patches)


def test_mixup_is_a_convex_combination_and_token_own_is_lam():
    x = torch.randn(4, 3, 16, 16, generator=gen(1))
    m = mix_images(x, "mixup", GRID, gen(2), alpha=0.8)
    assert m.box is None and 0 < m.lam < 1
    assert torch.allclose(m.images, m.lam * x + (1 - m.lam) * x.flip(0))
    assert torch.allclose(m.token_own, torch.full((16,), m.lam))


def test_none_and_input_untouched():
    x = torch.randn(4, 3, 16, 16, generator=gen(1))
    keep = x.clone()
    m = mix_images(x, "none", GRID, gen(0))
    assert m.lam == 1.0 and torch.equal(m.images, x) and torch.equal(m.token_own, torch.ones(16))
    for kind in KINDS:
        mix_images(x, kind, GRID, gen(0))
    assert torch.equal(x, keep)


def test_mixup_cutmix_patch_switches_to_the_token_grid_box():
    """TL-Align's code draws the CutMix branch on the token grid: whole patches only."""
    x = labelled_batch()
    assert mix_images(x, "mixup_cutmix_patch", GRID, gen(0), switch_prob=0.0).kind == "mixup"
    for seed in range(10):
        m = mix_images(x, "mixup_cutmix_patch", GRID, gen(seed), switch_prob=1.0)
        assert m.kind == "cutmix_patch" and set(m.token_own.tolist()) <= {0.0, 1.0}


def test_mixup_cutmix_switches():
    x = labelled_batch()
    assert mix_images(x, "mixup_cutmix", GRID, gen(0), switch_prob=1.0).kind == "cutmix"
    assert mix_images(x, "mixup_cutmix", GRID, gen(0), switch_prob=0.0).kind == "mixup"
    kinds = {mix_images(x, "mixup_cutmix", GRID, gen(s)).kind for s in range(20)}
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_mix(kind):
    x = torch.randn(4, 3, 16, 16, generator=gen(1))
    a, b = mix_images(x, kind, GRID, gen(7)), mix_images(x, kind, GRID, gen(7))
    assert a.lam == b.lam and a.box == b.box and a.kind == b.kind
    assert torch.equal(a.images, b.images) and torch.equal(a.token_own, b.token_own)
    if kind != "none":
        draws = {mix_images(x, kind, GRID, gen(s)).lam for s in range(5)}
        assert len(draws) > 1


def test_bad_arguments():
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="kind"):
        mix_images(x, "puzzlemix", GRID, gen())
    with pytest.raises(ValueError, match="whole number"):
        mix_images(x, "cutmix", (3, 3), gen())
    with pytest.raises(ValueError, match="alpha"):
        mix_images(x, "mixup", GRID, gen(), alpha=0.0)


def test_mix_targets_by_hand():
    y = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert torch.allclose(mix_targets(y, 0.75), torch.tensor([[0.75, 0, 0.25], [0, 1.0, 0], [0.25, 0, 0.75]]))


def test_mix_token_targets_by_hand():
    # 2 images x 2 tokens x 2 classes; token 0 fully own, token 1 a quarter own
    t = torch.tensor([[[1.0, 0], [1.0, 0]], [[0, 1.0], [0.5, 0.5]]])
    own = torch.tensor([1.0, 0.25])
    want = torch.tensor([[[1.0, 0], [0.25 + 0.375, 0.375]], [[0, 1.0], [0.125 + 0.75, 0.125]]])
    assert torch.allclose(mix_token_targets(t, own), want)
    assert torch.allclose(mix_token_targets(t, own.expand(2, 2)), want)  # per-sample shares [B, N]


# mixed share of tokens and empty boxes with lam ~ Beta(1, 1), 20,000 draws (SE of the share ~0.002); the
# authors' values match an independent run of their sampler (int side, [c - s // 2, c + s // 2) clipped)
SAMPLER_STATS = {  # (grid, sampler): (mixed share, empty-box share)
    (8, "authors"): (0.233, 0.062), (14, "authors"): (0.271, 0.020),
    (8, "rounded"): (0.325, 0.004), (14, "rounded"): (0.322, 0.002),
}


@pytest.mark.parametrize("grid,sampler", sorted(SAMPLER_STATS))
def test_box_sampler_statistics(grid, sampler):
    g = gen(0)
    lams = [sample_token_box((grid, grid), g, 1.0, sampler)[1] for _ in range(20000)]
    share, empty = SAMPLER_STATS[grid, sampler]
    assert 1 - sum(lams) / len(lams) == pytest.approx(share, abs=0.006)
    assert sum(lam == 1.0 for lam in lams) / len(lams) == pytest.approx(empty, abs=0.004)


def test_authors_boxes_have_even_sides_on_every_mixing_path():
    """CutMix (pixels), patch-aligned CutMix and MixToken share the authors' sampler by default."""
    x = torch.randn(2, 3, 32, 32)
    for seed in range(40):
        (y0, y1, x0, x1), _ = sample_token_box((14, 14), gen(seed))
        clipped = y0 == 0 or x0 == 0 or y1 == 14 or x1 == 14
        assert clipped or ((y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0)
        for kind, unit in (("cutmix", 1), ("cutmix_patch", 4)):
            m = mix_images(x, kind, (8, 8), gen(seed))
            by0, by1, bx0, bx1 = (v // unit for v in m.box)
            inside = 0 < by0 and 0 < bx0 and by1 < 32 // unit and bx1 < 32 // unit
            assert not inside or ((by1 - by0) % 2 == 0 and (bx1 - bx0) % 2 == 0)
    # random patch mixing truncates its count as TL-Align's code does; "rounded" rounds
    counts = {s: [int((mix_images(x, "patch", (8, 8), gen(seed), sampler=s).token_own == 0).sum()) for seed in range(200)]
              for s in ("authors", "rounded")}
    assert sum(counts["authors"]) < sum(counts["rounded"])
    assert all(a <= r for a, r in zip(counts["authors"], counts["rounded"]))
