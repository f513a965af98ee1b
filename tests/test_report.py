"""The report: every table row defined, one training run per configuration, CI math, verdicts, tables that
render with pending rows, and figures written as real PNGs (on a tiny synthetic dataset, no training)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlvit.config import ConfigError, config_hash, load_params, load_rows, pipeline_rows, resolve_run_config
from tlvit.layout import Layout
from tlvit.report import build_report
from tlvit.report.stats import diff_ci95, ci95, t95, verdict
from tlvit.tables import (all_rows, duplicate_configs, experiment_for_row, load_tables, resolve_rows,
                          set_rows_in_params, table_rows)

REPO = Path(__file__).resolve().parents[1]
PARAMS, ROWS, TABLES = REPO / "params.yaml", REPO / "experiments" / "rows.yaml", REPO / "experiments" / "tables"
EXPECTED_TABLES = {f"lvvit_table{i}" for i in range(3, 10)} | {f"tlalign_table{i}" for i in (1, 2, 7, 8)}
# Two row ids, one config: on `imagenet` the preset recipe already has RandAugment + erasing (LV-ViT Table 7).
EXPECTED_DUPLICATES = {"imagenet": [{"lvvit_s_token_labeling", "lvvit_s_tl_aug"},
                                  # the headline decomposition row is Table 7's where the preset has both augmentations
                                  {"lvvit_s_token_labeling_no_mixtoken", "lvvit_s_tl_aug_no_mixtoken"}]}


# ------------------------------------------------------------------------------------------ tables as data
def test_every_table_and_row_is_defined():
    tables = load_tables(TABLES)
    rows = load_rows(ROWS)
    assert EXPECTED_TABLES <= {t.key for t in tables}
    for t in tables:
        assert t.rows, t.key
        for r in t.rows:
            assert r["row"] in rows, f"{t.key}: row {r['row']!r} is not in experiments/rows.yaml"
            assert isinstance(r.get("paper"), (int, float)), f"{t.key}: {r['row']} has no paper value"
            assert r.get("label"), f"{t.key}: {r['row']} has no label"
            if r.get("series"):
                assert r.get("params_m"), f"{t.key}: {r['row']} is on the scaling figure without params_m"
            if r.get("vs"):
                assert r["vs"] in t.row_ids, f"{t.key}: {r['row']} compares with {r['vs']}, not a row of the table"
        for c in t.claims():
            assert c.row in t.row_ids and c.vs in t.row_ids and c.row != c.vs
            assert c.paper_delta is not None
    by_key = {t.key: t for t in tables}
    t3 = by_key["lvvit_table3"]
    assert len(t3.rows) == 8 and t3.rows[0]["row"] == "deit_s_mixup_cutmix" and t3.rows[-1]["row"] == "lvvit_s_token_labeling_384"
    assert [c.paper_delta for c in t3.claims()][:2] == [1.3, -0.1]  # the path: each step against the one before


@pytest.mark.parametrize("preset", ["embedded", "smoke", "imagenet", "embedded-full"])
def test_one_training_run_per_configuration(preset):
    """No two row ids resolve to the same config hash, except the declared one (then `tlvit rows` lists it once)."""
    params = load_params(PARAMS)
    if preset not in params["presets"]:
        pytest.skip(f"no preset {preset}")
    configs = resolve_rows(params, preset, list(load_rows(ROWS)), ROWS, PARAMS)
    dups = [set(g) for g in duplicate_configs(configs)]
    assert sorted(map(sorted, dups)) == sorted(map(sorted, EXPECTED_DUPLICATES.get(preset, [])))
    rows = all_rows(params, preset, TABLES, ROWS, PARAMS)
    assert len(rows) == len(set(rows)) == len({config_hash(configs[r]) for r in table_rows(load_tables(TABLES))})
    for child, parent in (("lvvit_s_token_labeling_384", "lvvit_s_token_labeling"), ("deit_b_tlalign", "deit_b_mixup_cutmix")):
        assert rows.index(parent) < rows.index(child)


def test_embedded_table4_stems_are_the_registered_variants():
    """The Table 4 rows' embedded stems (written out in rows.yaml) build exactly lvvit_e_pe<row>."""
    import timm

    import tlvit.models  # noqa: F401
    from tlvit.train import build_model

    params = load_params(PARAMS)
    for k, row in {1: "lvvit_s_pe1", 2: "lvvit_s_pe2", 3: "lvvit_s_pe3", 4: "lvvit_s_pe4", 5: "lvvit_s_skip1",
                   6: "lvvit_s_pe6", 7: "lvvit_s_pe7"}.items():
        cfg = resolve_run_config(params, row, preset="embedded", rows_path=ROWS, params_path=PARAMS)
        with torch.device("meta"):
            ours = build_model(cfg, 10)
            ref = timm.create_model(f"lvvit_e_pe{k}", num_classes=10, aux_head=False)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()], row


def test_experiment_for_row_one_experiment_per_table():
    name, tags = experiment_for_row("deit_s_mixup_cutmix", "embedded", TABLES)
    assert name == "tlvit-embedded-lvvit_table3"  # its first table in reading order
    assert tags["tables"] == "lvvit_table3,tlalign_table7,tlalign_table9"
    assert tags["table.lvvit_table3"] == "Baseline (DeiT-Small)" and tags["paper.lvvit_table3"] == "79.9"
    name, tags = experiment_for_row("deit_s_vanilla", "embedded", TABLES)
    assert name == "tlvit-embedded-tlalign_table2" and tags["tables"] == "tlalign_table2,tlalign_table7,tlalign_table9"
    assert tags["table.tlalign_table2"] == "Vanilla" and tags["paper.tlalign_table2"] == "76.4"
    assert experiment_for_row("lvvit_s_tl_aug_mixup", "smoke", TABLES)[0] == "tlvit-smoke-lvvit_table7"
    assert experiment_for_row("not_in_any_table", "embedded", TABLES) == ("tlvit-embedded", {})
    # on imagenet one run trains both lvvit_s_token_labeling and LV-ViT Table 7's full-recipe row
    params = load_params(PARAMS)
    name, tags = experiment_for_row("lvvit_s_token_labeling", "imagenet", TABLES, params=params, rows_path=ROWS,
                                    params_path=PARAMS)
    assert name == "tlvit-imagenet-lvvit_table3" and tags["tables"] == "lvvit_table3,lvvit_table6,lvvit_table7,lvvit_table8"
    assert tags["table.lvvit_table7"] == "MixToken + CutOut + RandAug (full recipe)"
    assert "table.lvvit_table7" not in experiment_for_row("lvvit_s_token_labeling", "embedded", TABLES, params=params,
                                                          rows_path=ROWS, params_path=PARAMS)[1]


def test_set_rows_in_params_keeps_the_rest(tmp_path):
    text = "# head\npreset: embedded\nrows: [a, b]  \nlauncher:\n  kind: local\n"
    out = set_rows_in_params(text, ["x", "y", "z"])
    assert out == "# head\npreset: embedded\nrows:\n- x\n- y\n- z\nlauncher:\n  kind: local\n"
    block = "preset: embedded\nrows:\n  - a\n  - b\nlauncher: {}\n"
    assert set_rows_in_params(block, ["x"]) == "preset: embedded\nrows:\n- x\nlauncher: {}\n"
    # the form `dvc exp run -S` writes (a list at column 0) is replaced whole
    assert set_rows_in_params("preset: e\nrows:\n- a\n- b\nlauncher: {}\n", ["y", "z"]) == \
        "preset: e\nrows:\n- y\n- z\nlauncher: {}\n"


def test_rows_cli_writes_params(tmp_path):
    import argparse

    from tlvit import rows_cli
    from tlvit.cli import COMMANDS

    assert COMMANDS["rows"] == "tlvit.rows_cli"
    parser = argparse.ArgumentParser()
    rows_cli.add_parser(parser.add_subparsers())
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    args = parser.parse_args(["rows", "--all", "--params", str(params), "--rows-file", str(ROWS), "--tables", str(TABLES),
                              "--preset", "embedded", "--write"])
    assert args.func(args) == 0
    written = load_params(params)
    expected = all_rows(load_params(PARAMS), "embedded", TABLES, ROWS, PARAMS)
    # fine-tunes go to `finetunes` (their own DVC stages, after the parent), the rest to `rows`; none lost
    assert list(pipeline_rows(written)) == [r for r in expected if r not in written["finetunes"]] + list(written["finetunes"])
    assert sorted(pipeline_rows(written)) == sorted(expected)
    assert written["finetunes"] == {"lvvit_s_token_labeling_384": "lvvit_s_token_labeling", "deit_b_tlalign": "deit_b_mixup_cutmix",
                                    "swin_b_tlalign": "swin_b_mixup_cutmix"}
    strip = lambda text, p: text.replace("rows:" + "".join(f"\n- {r}" for r in p["rows"]), "").replace(  # noqa: E731
        "finetunes: {" + ", ".join(f"{k}: {v}" for k, v in p["finetunes"].items()) + "}", "")
    assert strip(params.read_text(), written) == strip(PARAMS.read_text(), load_params(PARAMS))


def test_a_downstream_preset_lists_the_downstream_tables_rows_and_their_parents(tmp_path):
    """`rows_from: downstream` (embedded-downstream): `tlvit rows` without a table choice lists the rows of the
    segmentation, detection and transfer tables with the parents of their fine-tunes, and nothing else; other presets
    keep every classification table's rows."""
    import argparse

    import yaml

    from tlvit import rows_cli
    from tlvit.tables import DETECTION_TABLE, SEGMENTATION_TABLES, TRANSFER_TABLE, preset_rows

    params = load_params(PARAMS)
    wanted = {r["row"] for path in [*SEGMENTATION_TABLES.values(), DETECTION_TABLE, TRANSFER_TABLE]
              for r in yaml.safe_load(open(REPO / path))["rows"]}
    down = preset_rows(params, "embedded-downstream", TABLES, ROWS, PARAMS, root=REPO)
    assert set(down) == wanted and len(down) == len(wanted) == 17  # no parent outside the tables: each is a table row
    assert down.index("swin_b_mixup_cutmix") < down.index("swin_b_tlalign")  # parents first
    assert {"lvvit_s_pe3", "deit_s_vanilla", "pvt_t_tlalign"}.isdisjoint(down)  # classification-only rows
    assert preset_rows(params, "embedded-full", TABLES, ROWS, PARAMS, root=REPO) == all_rows(params, "embedded-full", TABLES,
                                                                                              ROWS, PARAMS)
    parser = argparse.ArgumentParser()
    rows_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "params.yaml"
    out.write_text(PARAMS.read_text())
    args = parser.parse_args(["rows", "--params", str(out), "--rows-file", str(ROWS), "--tables", str(TABLES),
                              "--preset", "embedded-downstream", "--write"])
    assert args.func(args) == 0
    written = load_params(out)
    assert sorted(pipeline_rows(written)) == sorted(down)
    assert written["finetunes"] == {"swin_b_tlalign": "swin_b_mixup_cutmix", "deit_b_tlalign": "deit_b_mixup_cutmix"}
    bad = load_params(PARAMS)
    bad["presets"]["embedded-downstream"]["rows_from"] = "segmentation"
    with pytest.raises(ConfigError, match="rows_from must be `tables` or `downstream`"):
        preset_rows(bad, "embedded-downstream", TABLES, ROWS, PARAMS, root=REPO)


def test_the_downstream_preset_trains_its_parents_with_embedded_fulls_recipe():
    """Its fine-tunes' parents are embedded-full's runs: the same resolved config but for the preset's name."""
    from tlvit.config import resolve_run_config
    from tlvit.tables import downstream_rows

    params = load_params(PARAMS)
    for row in downstream_rows(REPO):
        full, down = (resolve_run_config(params, row, preset=p, rows_path=ROWS, params_path=PARAMS)
                      for p in ("embedded-full", "embedded-downstream"))
        same = {"preset": None, "init_from_hash": None}  # the preset's name, and through it the parent's hash
        assert {**full, **same} == {**down, **same}, row
    sections = params["presets"]
    assert sections["embedded-downstream"]["segmentation"]["heads"] == ["fcn", "upernet"]
    assert sections["embedded-downstream"]["transfer"]["tasks"] == ["digits"]
    # embedded-full leaves the downstream tables to it
    assert sections["embedded-full"]["segmentation"]["rows"] == sections["embedded-full"]["detection"]["rows"] == "none"
    assert sections["embedded-full"]["transfer"]["tasks"] == []


def test_set_finetunes_in_params_added_when_missing():
    out = set_rows_in_params("preset: e\nrows: [a]\nlauncher: {}\n", ["a"], {"b": "a"})
    assert out == "preset: e\nrows:\n- a\nfinetunes: {b: a}\nlauncher: {}\n"
    block = "rows: [a]\nfinetunes:\n  x: a\nlauncher: {}\n"
    assert set_rows_in_params(block, ["a", "c"], {"d": "c"}) == "rows:\n- a\n- c\nfinetunes: {d: c}\nlauncher: {}\n"


# ------------------------------------------------------------------------------------------ statistics
def test_t_quantiles_and_intervals():
    # the printed table of t_0.975
    for dof, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042), (120, 1.980), (1e9, 1.960)):
        assert t95(dof) == pytest.approx(t, abs=1e-3), dof
    assert ci95([1.0]) is None
    assert ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)  # sd 1, n 3
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (1, 1.5, 2.5, 3.7, 7, 12.2, 29.5, 80, 199, 201, 500, 1e5):
        assert t95(dof) == pytest.approx(scipy_stats.t.ppf(0.975, dof), rel=1e-5), dof
    a, b = [80.1, 80.9, 80.5], [79.0, 79.6, 79.9, 79.3]
    delta, half = diff_ci95(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert delta == pytest.approx(np.mean(a) - np.mean(b))
    assert half == pytest.approx(scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb), rel=0.01)
    assert diff_ci95([1.0], [2.0, 3.0]) == (-1.5, None)
    assert diff_ci95([2.0, 2.0], [1.0, 1.0]) == (1.0, 0.0)


@pytest.mark.parametrize("paper, a, b, kind, text", [
    (0.8, None, [1.0, 2.0], "pending", "pending"),
    (0.8, [80.0], [79.0, 79.2], "inconclusive", "inconclusive (n<2 seeds)"),
    (0.8, [80.6, 80.8, 80.7], [79.8, 79.9, 80.0], "reproduced", "reproduced at this scale"),
    (-0.1, [80.6, 80.8, 80.7], [79.8, 79.9, 80.0], "not_reproduced", "not reproduced (opposite sign)"),
    (0.8, [80.0, 81.0, 79.0], [79.9, 80.1, 80.0], "not_reproduced", "not reproduced (CI includes 0)"),
    (0.0, [80.0, 81.0, 79.0], [79.9, 80.1, 80.0], "consistent", "consistent (paper: no difference; CI includes 0)"),
    (0.0, [80.6, 80.8, 80.7], [79.8, 79.9, 80.0], "not_reproduced", "not reproduced (paper: no difference; CI excludes 0)"),
])
def test_verdicts(paper, a, b, kind, text):
    v = verdict(paper, a, b)
    assert (v.kind, v.text) == (kind, text)


# ------------------------------------------------------------------------------------------ the report itself
def _fake_metrics(layout: Layout, params: dict, row: str, top1: list[float], *, name: str | None = None,
                  hash_override: str | None = None) -> None:
    cfg = resolve_run_config(params, row, preset=layout.preset, rows_path=ROWS, params_path=PARAMS)
    runs = [{"seed": s, "top1": v, "top5": 99.0, "mlflow_run_id": f"{s:032x}", "git_commit": "0123456789abcdef"}
            for s, v in enumerate(top1)]
    curves = [{"seed": s, "epoch": [1, 2, 3], "val_top1": [v - 20, None, v], "ema_val_top1": [v - 30, v - 10, v],
               "train_loss": [2.0, 1.5, 1.2], "lr": [1e-3] * 3} for s, v in enumerate(top1)]
    m = {"row": row, "preset": layout.preset, "config_hash": hash_override or config_hash(cfg), "n_seeds": len(top1),
         "runs": runs, "curves": curves}
    path = layout.row_metrics(name or row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))


def _fake_dataset(layout: Layout, n: int = 12) -> None:
    """Val canvases (random blobs), their ground-truth maps and a random annotator store: just enough to draw."""
    from tlvit.labels.score_maps import ScoreMapWriter

    root = layout.data_dir / "canvases"
    rng = np.random.default_rng(0)
    paths, maps, labels = [], [], []
    for i in range(n):
        c = i % 10
        rel = f"{c}/val_{i:06d}.png"
        (root / "val" / str(c)).mkdir(parents=True, exist_ok=True)
        img = (rng.random((64, 64)) > 0.8).astype(np.uint8) * 255
        Image.fromarray(img, mode="L").save(root / "val" / rel)
        paths.append(rel)
        maps.append(np.where(img > 0, c, 255).astype(np.uint8))
        labels.append(c)
    order = np.argsort(paths)
    np.savez(root / "gt_maps_val.npz", paths=np.array(paths)[order], maps=np.stack(maps)[order], labels=np.array(labels)[order])
    layout.dataset_file.write_text(json.dumps({"kind": "canvases", "root": str(root.relative_to(layout.root))}))
    paths = sorted(paths)
    w = ScoreMapWriter(layout.score_maps("annotator", "val"), num_images=n, k=5, grid=(16, 16), num_classes=10, meta={},
                       chunk=n)
    logits = rng.normal(size=(n, 5, 16, 16)).astype(np.float16)
    logits.sort(axis=1)
    classes = np.stack([rng.permutation(10)[:5] for _ in range(n * 256)]).reshape(n, 16, 16, 5).transpose(0, 3, 1, 2)
    w.write_chunk(0, logits[:, ::-1].copy(), classes.astype(np.uint8))
    w.finish(paths, [(64, 64)] * n)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over two tables with some rows run, one stale, one found by config hash, and a DeiT checkpoint."""
    from tlvit.train import build_model

    root = tmp_path_factory.mktemp("report")
    tables = root / "tables"
    tables.mkdir()
    for key in ("lvvit_table3", "tlalign_table1"):
        shutil.copy(TABLES / f"{key}.yaml", tables / f"{key}.yaml")
    params = load_params(PARAMS)
    params["preset"] = "embedded"
    layout = Layout("embedded", root)
    _fake_dataset(layout)
    seeds = lambda mu: [mu - 0.2, mu + 0.05, mu + 0.2]  # noqa: E731
    _fake_metrics(layout, params, "deit_s_mixup_cutmix", seeds(80.0))
    _fake_metrics(layout, params, "deit_s_depth16", seeds(82.0))  # the paper's +1.3: reproduced
    _fake_metrics(layout, params, "lvvit_s_baseline", [84.0])  # one seed: inconclusive
    _fake_metrics(layout, params, "lvvit_s_skip1", seeds(83.0), hash_override="0123456789ab")  # an older config: stale
    _fake_metrics(layout, params, "deit_s_cutmix", seeds(81.0))
    _fake_metrics(layout, params, "deit_s_tlalign", seeds(81.0), name="renamed_row")  # found by its config hash
    cfg = resolve_run_config(params, "deit_s_tlalign", preset="embedded", rows_path=ROWS, params_path=PARAMS)
    run_dir = layout.run_dir("renamed_row", 0)
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg, 10).state_dict(), "config": cfg, "epoch": 3}, run_dir / "checkpoint.pt")
    index = build_report(params, tables_dir=tables, rows_path=ROWS, params_path=PARAMS, layout=layout,
                         out_dir=root / "reports")
    return root / "reports", index


def _line(md: str, label: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {label} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_tables_render_pending_stale_and_shared_rows(report):
    out, _ = report
    t3 = (out / "lvvit_table3.md").read_text()
    base = _line(t3, "Baseline (DeiT-Small)")
    assert base[2].startswith("80.") and "±" in base[2] and base[5] == "3" and re.fullmatch(r"[0-9a-f]{12}", base[6])
    for label in ("+ Less MLP expansion ratio (4 → 3)", "+ Re-labeling", "+ Token labeling", "+ Input resolution (224 → 384)"):
        cells = _line(t3, label)
        assert cells[2] == "pending" and cells[4] == "—" and cells[5] == "0" and cells[6] == "pending", cells
    assert _line(t3, "+ More convs for patch embedding")[2] == "stale (re-run)"
    assert "± " not in _line(t3, "+ Enhanced residual connection")[2]  # one seed: no interval
    assert float(_line(t3, "Baseline (DeiT-Small)")[7]) == pytest.approx(0.209, abs=1e-3)  # params of the built deit_e
    t1 = (out / "tlalign_table1.md").read_text()
    shared = _line(t1, "DeiT-S + TL-Align")
    assert shared[2].startswith("81.") and "same config as renamed_row" in t1
    assert _line(t1, "DeiT-S")[9] == "95.00"  # paper top-5
    csv = (out / "lvvit_table3.csv").read_text()
    assert "pending" in csv and ",0.0," not in csv


def test_claims_carry_verdicts(report):
    out, _ = report
    t3 = (out / "lvvit_table3.md").read_text()
    claims = t3.split("### Claimed differences")[1]
    step = _line(claims, "+ More transformers (12 → 16) vs Baseline (DeiT-Small)")
    assert step[1] == "+1.30" and step[3] == "3 / 3" and step[4] == "reproduced at this scale"
    assert _line(claims, "+ Enhanced residual connection vs + More convs for patch embedding")[4] == "pending"  # stale
    assert _line(claims, "+ Re-labeling vs + Enhanced residual connection")[4] == "pending"
    t1 = (out / "tlalign_table1.md").read_text()
    assert _line(t1.split("### Claimed differences")[1], "DeiT-S + TL-Align vs DeiT-S")[4].startswith("not reproduced")
    rows = (out / "lvvit_table3_claims.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 and rows[0].startswith("Claim,Paper Δ,Reproduced Δ,CI half-width,Seeds,Verdict,kind")


def test_figures_are_pngs_and_indexed(report):
    out, index = report
    text = index.read_text()
    figures = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"lvvit_table3.png", "lvvit_table3_path.png", "lvvit_table3_curves.png", "tlalign_table1.png", "scaling.png",
            "dense_labels.png", "tl_align_labels.png", "tl_align_rmse.png"} <= names
    for p in figures:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200, p.name
            img.verify()
        assert f"figures/{p.name}" in text, p.name
    for key in ("lvvit_table3", "tlalign_table1"):
        for suffix in (".md", ".csv", "_claims.csv", ".tex"):
            assert f"({key}{suffix})" in text and (out / f"{key}{suffix}").is_file()
    assert "training_curves.png" in names and "*skipped*" not in text  # every figure had its inputs


def test_report_without_any_run(tmp_path):
    """Nothing trained, no data: every table renders, every row pending, figures that need inputs are skipped."""
    params = load_params(PARAMS)
    params["preset"] = "smoke"
    index = build_report(params, tables_dir=TABLES, rows_path=ROWS, params_path=PARAMS, layout=Layout("smoke", tmp_path),
                         out_dir=tmp_path / "reports")
    text = index.read_text()
    for t in load_tables(TABLES):
        md = (tmp_path / "reports" / f"{t.key}.md").read_text()
        assert re.search(rf"\]\({t.key}\.md\)\s*\|\s*0/{len(t.rows)}\s*\|", text), t.key
        assert md.count("| pending ") >= len(t.rows)
    assert text.count("*skipped*") == 4  # training curves, dense labels, TL-Align maps and RMSE (scaling draws paper values)


def test_git_commit_is_dirty_for_code_not_for_pipeline_outputs(tmp_path):
    import subprocess

    from tlvit.provenance import git_commit

    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "row.json").write_text("{}")
    (tmp_path / "dvc.lock").write_text("a")
    (tmp_path / "code.py").write_text("x = 1")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    sha = git_commit(tmp_path)
    assert len(sha) == 40
    (tmp_path / "metrics" / "row.json").write_text('{"top1": 1}')  # what `dvc repro` writes while it runs
    (tmp_path / "dvc.lock").write_text("b")
    assert git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2")
    assert git_commit(tmp_path) == sha + "-dirty"


def test_report_says_what_data_it_measured_and_flags_an_imagenet_subset(tmp_path):
    from tlvit.report.build import data_note
    from tlvit.report.results import Results

    params = load_params(PARAMS)
    layout = Layout("imagenet", tmp_path)
    assert "not built yet" in data_note(Results(layout, params, ROWS, PARAMS))
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / "tiny" / split / c).mkdir(parents=True)
    layout.data_dir.mkdir(parents=True)
    layout.dataset_file.write_text(json.dumps({"kind": "imagefolder", "root": str(tmp_path / "tiny"),
                                               "splits": {"train": 10, "val": 4}}))
    params["presets"]["imagenet"]["train"]["epochs"] = 1
    note = data_note(Results(layout, params, ROWS, PARAMS))
    assert f"`imagefolder` at `{tmp_path / 'tiny'}`, 2 classes, 10 train / 4 val images; recipe: 1 epochs" in note
    assert "**Subset run** (classes 2 < 1,000, train images 10 < 1,281,167, val images 4 < 50,000, epochs 1 < 300)" in note


def test_the_commit_column_keeps_the_dirty_mark():
    from tlvit.report.frames import short_commit

    assert short_commit("0123456789abcdef0123-dirty") == "0123456789ab-dirty"
    assert short_commit("0123456789abcdef0123") == "0123456789ab" and short_commit(None) == "unknown"


def test_a_tables_experiment_holds_all_its_rows_as_copies_made_once(tmp_path):
    """A run lives in its row's first table's experiment; the report copies it into its other tables' ones,
    once, and again only when the source has moved on (more metric points)."""
    from mlflow.tracking import MlflowClient

    from tlvit.tracking import MIRROR_TAG, mirror_into_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    src = client.create_run(client.create_experiment("tlvit-x-lvvit_table3"), run_name="lvvit_s_baseline-s0",
                            tags={"row": "lvvit_s_baseline"})
    rid = src.info.run_id
    client.log_param(rid, "supervision.kind", "ce")
    for step, v in ((1, 50.0), (2, 60.0)):
        client.log_metric(rid, "val_top1", v, step=step)
    client.set_terminated(rid, "FINISHED")
    first = mirror_into_experiment(rid, "tlvit-x-lvvit_table5", uri)
    assert mirror_into_experiment(rid, "tlvit-x-lvvit_table5", uri) == first  # found, not copied again
    assert mirror_into_experiment(rid, "tlvit-x-lvvit_table3", uri) is None  # its own experiment
    copy = client.get_run(first)
    assert copy.data.tags[MIRROR_TAG] == rid and copy.data.tags["row"] == "lvvit_s_baseline"
    assert copy.data.params["supervision.kind"] == "ce" and copy.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "val_top1")] == [(1, 50.0), (2, 60.0)]
    assert copy.info.end_time == client.get_run(rid).info.end_time
    client.log_metric(rid, "val_top1", 70.0, step=3)  # the source moved on: the copy follows
    again = mirror_into_experiment(rid, "tlvit-x-lvvit_table5", uri)
    assert again != first and len(client.get_metric_history(again, "val_top1")) == 3
    exp5 = client.get_experiment_by_name("tlvit-x-lvvit_table5").experiment_id
    assert [r.info.run_id for r in client.search_runs([exp5])] == [again]  # the stale copy is deleted
