"""The deviations registry: docs generated from it, every switch real, every row pair differing in its switch only."""
import json

import pytest

from tlvit.config import config_hash, load_params, resolve_run_config
from tlvit.deviations import DEVIATIONS, render_markdown
from tlvit.layout import Layout
from tlvit.report.deviations import deviations_frame, render_deviations
from tlvit.report.results import Results
from tlvit.report.stats import paired_diff_ci95

from repo_copy import REPO


def flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_docs_are_the_registry():
    assert (REPO / "docs" / "deviations.md").read_text() == render_markdown(), \
        "docs/deviations.md is stale: run `tlvit deviations --write docs/deviations.md`"


@pytest.mark.parametrize("preset", ["embedded-full", "imagenet"])
@pytest.mark.parametrize("dev", [d for d in DEVIATIONS if d.changes_training], ids=lambda d: d.key)
def test_row_pair_differs_in_its_switch_only(dev, preset):
    params = load_params(REPO / "params.yaml")
    rows = REPO / "experiments" / "rows.yaml"
    orig, other = (flat(resolve_run_config(params, r, preset=preset, rows_path=rows)) for r in dev.rows)
    keys = [k.strip() for k in dev.switch.split(",")]
    changed = {k for k in orig.keys() | other.keys() if orig.get(k) != other.get(k)} - {"row"}
    assert changed == set(keys)
    want_orig = [v.strip() for v in str(dev.original_value).split(",")]
    want_other = [v.strip() for v in str(dev.other_value).split(",")]
    assert [str(orig[k]) for k in keys] == want_orig and [str(other[k]) for k in keys] == want_other
    # the preset's own recipe has the registered default
    recipe = flat(params["presets"][preset]["train"])
    default = want_orig if dev.default == "original" else want_other
    assert [str(recipe[k]) for k in keys] == default


def test_paired_difference_by_hand():
    a = {0: 80.0, 1: 82.0, 2: 81.0, 5: 99.0}
    b = {0: 79.0, 1: 80.0, 2: 81.0}
    delta, half, n = paired_diff_ci95(a, b)
    assert n == 3 and delta == pytest.approx(1.0)  # seed 5 has no partner
    assert half == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-3)  # t(2) x sd([1, 2, 0]) / sqrt(3)
    assert paired_diff_ci95({0: 1.0}, {1: 2.0}) == (None, None, 0)


def test_deviations_table_pairs_seeds(tmp_path):
    params = load_params(REPO / "params.yaml")
    rows = REPO / "experiments" / "rows.yaml"
    layout = Layout("embedded-full", root=tmp_path)
    dev = next(d for d in DEVIATIONS if d.key == "align_smoothing")
    # the paired CI is narrow where seeds move both rows together; Welch's is wide
    values = {dev.rows[0]: [70.0, 80.0, 90.0], dev.rows[1]: [69.0, 78.5, 89.2]}
    for row, tops in values.items():
        cfg = resolve_run_config(params, row, preset="embedded-full", rows_path=rows)
        path = layout.row_metrics(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config_hash": config_hash(cfg), "row": row,
                                    "runs": [{"seed": s, "top1": t} for s, t in enumerate(tops)]}))
    df = deviations_frame(Results(layout, params, rows, REPO / "params.yaml")).set_index("deviation")
    line = df.loc["align_smoothing"]
    assert line["pairs"] == 3 and line["paired Δ (other - original)"] == pytest.approx(-1.1)
    assert line["paired CI95"] < 1.1 < line["Welch CI95"]
    assert line["verdict"].startswith("the switch changes top-1")
    assert df.loc["pooling", "verdict"] == "pending"
    text = render_deviations(df.reset_index(), "embedded-full")
    assert "-1.10 ±" in text and "`deit_s_tlalign_smooth_cls_slot`" in text


def test_report_lists_the_recipe_conflicts_with_both_values():
    from tlvit.report.deviations import render_recipe_conflicts

    text = render_recipe_conflicts("embedded-full")
    line = next(line for line in text.splitlines() if line.startswith("| `lvvit_l_img_size`"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "`img_size`: `224` / `288`" and cells[5] == "paper" and cells[7] == "`lvvit_l_token_labeling`"
    lr = next(line for line in text.splitlines() if line.startswith("| `lvvit_l_lr`"))
    assert [c.strip() for c in lr.strip("|").split("|")][5] == "code"
    assert "imagenet` preset's rows only" in text and "rows only" not in render_recipe_conflicts("imagenet")
