"""The headline evidence: claims judged on the paired Δ over seeds, rows checked against the pre-registered
criteria (experiments/headline.yaml), and the schedule that scores a long val split only where convergence is judged."""
from __future__ import annotations

import json

import pytest

from tlvit.config import ConfigError, config_hash, load_params, resolve_run_config
from tlvit.layout import Layout
from tlvit.report.headline import claims_frame, load_headline, render, row_frame
from tlvit.report.results import Results
from tlvit.report.stats import paired_verdict
from tlvit.tables import all_rows, load_tables
from tlvit.train import evaluates_at

PARAMS, ROWS, TABLES = "params.yaml", "experiments/rows.yaml", "experiments/tables"


def test_a_long_val_split_is_scored_every_nth_epoch_and_through_the_plateau_window():
    cfg = {"eval_every": 5, "eval_last_epochs": 4}
    assert [e for e in range(1, 21) if evaluates_at(cfg, e, 20)] == [5, 10, 15, 17, 18, 19, 20]
    assert [e for e in range(1, 21) if evaluates_at({"eval_every": 5}, e, 20)] == [5, 10, 15, 20]
    assert [e for e in range(1, 4) if evaluates_at({}, e, 3)] == [1, 2, 3]  # the default: every epoch
    assert [e for e in range(1, 8) if evaluates_at({"eval_every": 4}, e, 7)] == [4, 7]  # the last one always


def test_paired_verdicts():
    assert paired_verdict(None, None, 0, 0.5).kind == "pending"
    assert paired_verdict(1.0, None, 1, 0.5).kind == "inconclusive"
    assert paired_verdict(1.0, 0.6, 5, 0.5).kind == "reproduced"
    assert paired_verdict(-1.0, 0.6, 5, 0.5).kind == "opposite"
    assert paired_verdict(0.05, 0.3, 5, 0.5).kind == "no_effect"  # CI [-0.25, 0.35]: rules out gains >= 0.5
    assert paired_verdict(0.3, 0.6, 5, 0.5).kind == "inconclusive"  # CI [-0.3, 0.9]: a 0.5 gain is not ruled out


def test_the_registered_claims_name_defined_rows_and_every_criterion(tmp_path):
    spec = load_headline()
    assert spec.preset == "embedded-headline"
    assert {c["id"] for c in spec.claims} == {"token_labeling_order", "mixtoken_over_cutmix", "conv_stem", "tl_align",
                                              "model_size"}
    assert "lvvit_s_token_labeling_oracle" in spec.rows and len(spec.rows) == 16
    # `tlvit rows --headline`: every row resolves and trains once under the headline preset
    params = load_params(PARAMS)
    assert all_rows(params, spec.preset, TABLES, ROWS, PARAMS, wanted=spec.rows) == spec.rows
    bad = tmp_path / "h.yaml"
    bad.write_text("preset: embedded\ncriteria: {seeds: 5}\nclaims: [{id: x, pairs: [[a, b]]}]\n")
    with pytest.raises(ConfigError, match="criteria .* missing"):
        load_headline(bad)
    text = (tmp_path / "h2.yaml")
    text.write_text("preset: embedded\ncriteria: {seeds: 5, plateau_points: .5, seed_std_points: 1, val_canvases: 1,"
                    " deit_cutmix_top1: 80, min_effect_points: .5}\nclaims: [{id: x, pairs: [[a, b, c]]}]\n")
    with pytest.raises(ConfigError, match="`pairs` must list"):
        load_headline(text)


def _fake_row(layout: Layout, params: dict, row: str, top1: list[float], cls_only: list[float] | None = None,
              rising: float = 0.0) -> None:
    """A finished row: per seed its top-1 and an EMA curve over 10 epochs that ends there (rising `rising` points
    an epoch over the last ones)."""
    cfg = resolve_run_config(params, row, preset=layout.preset, rows_path=ROWS, params_path=PARAMS)
    runs = [{"seed": s, "top1": v, "top1_ema": v, "top1_cls_only": (cls_only or top1)[s], "mlflow_run_id": f"{s:032x}",
             "git_commit": "0123456789abcdef"} for s, v in enumerate(top1)]
    curves = [{"seed": s, "epoch": list(range(1, 11)), "val_top1": [v] * 10,
               "ema_val_top1": [v - rising * (10 - e) for e in range(1, 11)]} for s, v in enumerate(top1)]
    path = layout.row_metrics(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"row": row, "preset": layout.preset, "config_hash": config_hash(cfg),
                                "n_seeds": len(top1), "runs": runs, "curves": curves}))


def test_claims_are_judged_on_the_paired_difference_and_rows_on_the_criteria(tmp_path):
    params = load_params(PARAMS)
    spec = load_headline()
    layout = Layout(spec.preset, tmp_path)
    # seeds differ by several points, the pair by a steady +0.6: Welch's CI includes 0, the paired one does not
    base = [85.0, 88.0, 91.0, 86.5, 89.5]
    _fake_row(layout, params, "lvvit_s_token_labeling", [b + 0.6 + 0.05 * (s % 2) for s, b in enumerate(base)],
              cls_only=[b - 1.0 for b in base])
    _fake_row(layout, params, "lvvit_s_relabel_mixtoken", base, rising=0.5)
    _fake_row(layout, params, "lvvit_s_relabel", [b - 0.8 for b in base[:3]])  # three seeds in common
    results = Results(layout, params, ROWS, PARAMS)
    claims = claims_frame(spec, results, load_tables(TABLES)).set_index("Pair")
    tl = claims.loc["lvvit_s_token_labeling > lvvit_s_relabel_mixtoken"]
    assert tl["Paired Δ"] == pytest.approx(0.62) and tl["Pairs"] == 5 and tl["kind"] == "reproduced"
    assert tl["Welch CI half-width"] > abs(tl["Welch Δ"])  # unpaired, the same seeds would be inconclusive
    assert tl["Paper Δ"] == pytest.approx(0.3) and tl["Paper table"] == "lvvit_table6"  # 83.3 - 83.0
    assert claims.loc["lvvit_s_relabel > lvvit_s_baseline", "kind"] == "pending"
    rows = row_frame(spec, results).set_index("row_id")
    assert rows.at["lvvit_s_token_labeling", "Std ok"] == bool(rows.at["lvvit_s_token_labeling", "Seed std"] <= 1.0)
    assert not rows.at["lvvit_s_token_labeling", "Std ok"]  # std ~2.4 over these seeds
    assert rows.at["lvvit_s_token_labeling", "Plateau ok"] and rows.at["lvvit_s_token_labeling", "Seeds ok"]
    assert rows.at["lvvit_s_relabel_mixtoken", "Plateau trend"] == pytest.approx(1.0)  # 0.5 an epoch over epochs 8-10
    assert not rows.at["lvvit_s_relabel_mixtoken", "Plateau ok"]
    assert not rows.at["lvvit_s_relabel", "Seeds ok"]
    assert rows.at["lvvit_s_token_labeling", "Class token only"] == pytest.approx(sum(base) / 5 - 1.0)
    md = render(spec, results, row_frame(spec, results), claims.reset_index(), "abc")
    assert "**not frozen**" in md or "frozen on" in md
    assert "+0.62 [" in md and "Inference rule" in md and "`lvvit_s_token_labeling` +1.62" in md
