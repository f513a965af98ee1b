"""`tlvit tune`: candidates are the rows' configs plus their overrides, scored on the tuning split only."""
from __future__ import annotations

import pytest

from tlvit.config import ConfigError, load_params
from tlvit.report.stats import plateau_range, plateau_trend
from tlvit.tune import candidate_config, load_search


def test_plateau_range_is_the_spread_over_the_last_fifth_of_epochs():
    epochs = list(range(1, 11))
    assert plateau_range([10, 20, 30, 40, 50, 60, 70, 80, 81, 81.2], epochs) == pytest.approx(1.2)  # epochs 8..10
    assert plateau_range([10, 20, 30, 40, 50, 60, 70, 80, 80.1, 80.3], epochs) == pytest.approx(0.3)
    # evaluated every 2nd epoch: the window holds epoch 10, anchored by epoch 8's value
    assert plateau_range([None, 50, None, 60, None, 70, None, 75, None, 75.4], epochs) == pytest.approx(0.4)
    assert plateau_range([None] * 9 + [50.0], epochs) is None


def test_plateau_trend_averages_evaluation_noise_out():
    epochs = list(range(1, 31))
    flat_noisy = [80.0] * 24 + [79.2, 80.8, 79.4, 80.6, 79.6, 80.4]  # spread 1.6, no trend
    assert plateau_range(flat_noisy, epochs) == pytest.approx(1.6)
    assert abs(plateau_trend(flat_noisy, epochs)) < 0.5
    rising = [70.0 + 0.2 * e for e in epochs]  # 0.2 a point an epoch: 1.2 points over epochs 24..30
    assert plateau_trend(rising, epochs) == pytest.approx(1.2)
    assert plateau_trend(list(reversed(rising)), epochs) == pytest.approx(-1.2)
    assert plateau_trend([None] * 29 + [50.0], epochs) is None


def test_a_candidate_is_the_row_config_with_its_overrides_and_never_scores_on_val(tmp_path):
    search = tmp_path / "s.yaml"
    search.write_text("preset: embedded-tune\nrows: [deit_s_cutmix]\nseeds: [0]\n"
                      "candidates:\n  stem: {epochs: 12, ema_decay: null, model_kwargs: {stem_kernels: [7, 3, 3, 4]}}\n")
    spec, params = load_search(search), load_params("params.yaml")
    cfg = candidate_config(params, spec, "stem", "deit_s_cutmix")
    assert cfg["eval_split"] == "tune" and cfg["epochs"] == 12 and cfg["ema_decay"] is None
    assert cfg["model"] == "deit_e" and cfg["model_kwargs"]["stem_kernels"] == [7, 3, 3, 4]
    assert cfg["augment"]["mix"] == "cutmix"
    on_val = dict(spec, preset="embedded")  # its train section scores on val
    with pytest.raises(ConfigError, match="never scores on val"):
        candidate_config(params, on_val, "stem", "deit_s_cutmix")
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: embedded-tune\nrows: deit_s_cutmix\nseeds: [0]\ncandidates: {}\n")
    with pytest.raises(ConfigError, match="`rows` must be a list"):
        load_search(bad)
    typo = dict(spec, candidates={"x": {"epoch": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        candidate_config(params, typo, "x", "deit_s_cutmix")
