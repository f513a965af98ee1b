"""TL-Align Table 6's measures: mCE as the benchmark defines it, ImageNet-A/-R's 200-class arg-max, ImageNet-V2's
index folders, the corruption and rendition builders, and AutoAttack staying inside its L-inf ball."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tlvit.robustness import (ALEXNET_ERR, CORRUPTIONS, SEVERITIES, Normalised, autoattack_accuracy, class_index,
                              corrupt, corruption_error, outline, top1)


def test_mce_normalises_each_corruption_by_alexnet_then_averages():
    assert tuple(ALEXNET_ERR) == CORRUPTIONS and len(CORRUPTIONS) == 15  # the benchmark's 15, one constant each
    # a model with AlexNet's errors everywhere has mCE 100; half of them, 50
    alexnet = {c: {s: 100 * ALEXNET_ERR[c] for s in SEVERITIES} for c in CORRUPTIONS}
    assert corruption_error(alexnet)["mce"] == pytest.approx(100.0)
    half = {c: {s: 50 * ALEXNET_ERR[c] for s in SEVERITIES} for c in CORRUPTIONS}
    assert corruption_error(half)["mce"] == pytest.approx(50.0)
    # severities are summed before the ratio: errors 10..50 on brightness give CE = 30 / 56.4592
    errs = {c: {s: 100 * ALEXNET_ERR[c] for s in SEVERITIES} for c in CORRUPTIONS}
    errs["brightness"] = {s: 10.0 * s for s in SEVERITIES}
    out = corruption_error(errs)
    assert out["per_corruption"]["brightness"] == pytest.approx(100 * 0.30 / 0.564592)
    assert out["mce"] == pytest.approx((14 * 100 + 100 * 0.30 / 0.564592) / 15)
    assert corruption_error(errs, reference=None)["mean_error"] == pytest.approx(
        (sum(100 * ALEXNET_ERR[c] for c in CORRUPTIONS if c != "brightness") + 30) / 15)
    del errs["fog"][5]
    with pytest.raises(ValueError, match="fog"):
        corruption_error(errs)


def test_test_set_folders_map_to_the_models_classes():
    train = [f"n{i:08d}" for i in range(1000)]
    assert class_index(["0", "1", "10", "999"], train) == [0, 1, 10, 999]  # ImageNet-V2: folders are indices
    assert class_index(["n00000007", "n00000420"], train) == [7, 420]  # ImageNet-A/-R: WordNet ids
    with pytest.raises(ValueError, match="not classes of the train split"):
        class_index(["n99999999"], train)


def test_a_200_class_set_takes_the_argmax_over_its_classes_only():
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0], [5.0, 0.0, 3.0, 1.0]])
    targets = torch.tensor([3, 3])
    assert top1(logits, targets) == 0.0  # over all 4 classes: 1 and 0
    assert top1(logits, targets, classes=[2, 3]) == pytest.approx(50.0)  # over {2, 3}: 3 (right), 2 (wrong)
    assert top1(logits, targets, classes=[0, 1, 2, 3]) == 0.0  # every class: no mask


def test_corruptions_are_the_benchmarks_and_seeded():
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32)) * 255).astype(np.uint8)
    a = corrupt(img, "gaussian_noise", 3, seed=1)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, corrupt(img, "gaussian_noise", 3, seed=1))
    assert not np.array_equal(a, corrupt(img, "gaussian_noise", 3, seed=2))
    weak, strong = (np.abs(corrupt(img, "gaussian_noise", s, seed=1).astype(float) - img[..., None]).mean() for s in (1, 5))
    assert strong > weak > 0
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    corrupt(img, "shot_noise", 2, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's numpy generator is left as it was


def test_outline_keeps_the_digits_edges_and_drops_their_inside():
    canvas = np.zeros((16, 16), np.uint8)
    canvas[4:12, 4:12] = 255  # a filled square
    out = outline(canvas)
    assert out.dtype == np.uint8 and out.shape == canvas.shape
    assert out[8, 8] == 0 and out[4, 8] == 255 and out[3, 8] == 255 and out[0, 0] == 0


def test_autoattack_stays_in_its_ball_and_breaks_a_fragile_classifier():
    torch.manual_seed(0)
    # two classes separated by the mean pixel value with a margin of ~0.03: eps 4/255 (0.016) cannot cross it,
    # eps 16/255 (0.063) can
    x = torch.cat([torch.full((8, 3, 8, 8), 0.47), torch.full((8, 3, 8, 8), 0.53)]) + 0.002 * torch.rand(16, 3, 8, 8)
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])

    class MeanPixel(torch.nn.Module):  # 10 classes (AutoAttack's targeted attacks need several): 8 never win
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(50.0))

        def forward(self, z):
            m = z.mean((1, 2, 3)) - 0.5
            return torch.cat([torch.stack([-m, m], 1) * self.scale, torch.full((len(z), 8), -100.0)], 1)

    model = Normalised(MeanPixel(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    safe = autoattack_accuracy(model, x, y, eps=4 / 255)
    assert safe["clean_top1"] == 100.0 and safe["autoattack_top1"] == 100.0
    broken = autoattack_accuracy(model, x, y, eps=16 / 255)
    assert broken["clean_top1"] == 100.0 and broken["autoattack_top1"] == 0.0


def test_table6_renders_paper_next_to_reproduced_and_the_paired_deltas():
    from tlvit.report.robustness import render
    from tlvit.tables import ROBUSTNESS_TABLE, load_column_table

    table = load_column_table(ROBUSTNESS_TABLE)
    assert [r["row"] for r in table["rows"]][:2] == ["deit_t_cutmix", "deit_t_tlalign"]
    seeds = lambda base, shift: [{"seed": s, "val": base + shift + s, "v2": 50.0 + shift, "c": 40.0 - shift,  # noqa: E731
                                  "c_kind": "mean_error", "autoattack": 1.0 + s} for s in range(3)]
    record = {"preset": "embedded-full", "commit": "abc", "date": "2026-12-02",
              "rows": [{"row": "deit_s_cutmix", "seeds": seeds(70.0, 0.0), "sets": {"val": True, "v2": True, "a": False,
                                                                                   "c": True, "r": False}},
                       {"row": "deit_s_tlalign", "seeds": seeds(70.0, 1.0), "sets": {"val": True, "v2": True, "a": False,
                                                                                    "c": True, "r": False}}]}
    md = render(table, record)
    line = next(x for x in md.splitlines() if x.startswith("| DeiT-S + TL-Align |"))
    assert "80.60 / 72.00" in line and "68.90 / 51.00" in line and "not present" in line
    pair = next(x for x in md.splitlines() if x.startswith("| DeiT-S + TL-Align vs DeiT-S |"))
    assert "+0.80 / +1.00 [+1.00, +1.00]" in pair  # top-1: paper Δ, paired Δ (no spread)
    assert "-1.50 / -1.00" in pair  # C: lower is better
    assert "mean corruption error" in md and "| DeiT-T | 72.20 / —" in md
