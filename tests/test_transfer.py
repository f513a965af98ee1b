"""TL-Align Table 5 (transfer learning): the downstream sets, the fine-tune's config and start, and the table."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlvit.config import config_hash, load_params, resolve_run_config
from tlvit.data.canvases import CanvasSpec, write_canvases
from tlvit.data.transfer_sets import prepare_task
from tlvit.layout import Layout
from tlvit.report.transfer import render
from tlvit.tables import load_column_table
from tlvit.train import RunInputs, load_parent_weights, reported_weights, train
from tlvit.transfer import fine_tune_rows, finished_seeds, transfer_config

REPO = Path(__file__).resolve().parents[1]


def test_digits_task_is_an_imagefolder_of_centred_canvases(tmp_path):
    root = prepare_task("digits", tmp_path)
    assert root == tmp_path / "digits" and not (tmp_path / "digits.partial").exists()
    counts = {split: {c.name: len(list(c.iterdir())) for c in (root / split).iterdir()} for split in ("train", "val")}
    assert sorted(counts["train"]) == [str(d) for d in range(10)] == sorted(counts["val"])
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797  # scikit-learn's digits, all of them
    assert 0.28 < sum(counts["val"].values()) / 1797 < 0.32 and min(counts["val"].values()) >= 15  # stratified 30%
    img = np.asarray(Image.open(next((root / "val" / "3").iterdir())))
    assert img.shape == (64, 64, 3) and img[:12].max() == 0 and img[12:52, 12:52].max() > 100  # ink in the centre
    mtime = (root / "train").stat().st_mtime
    assert prepare_task("digits", tmp_path) == root and (root / "train").stat().st_mtime == mtime  # written once


def test_a_missing_downstream_set_is_not_present_and_a_wrong_task_is_refused(tmp_path):
    assert prepare_task("cifar10", tmp_path, {"cifar10": str(tmp_path / "nowhere")}) is None
    assert prepare_task("cars", tmp_path, {}) is None
    with pytest.raises(ValueError, match="use one of"):
        prepare_task("imagenet", tmp_path)


def test_the_fine_tune_config_is_the_parents_model_with_one_recipe():
    params = load_params(REPO / "params.yaml")
    recipe = params["presets"]["embedded"]["transfer"]["train"]
    configs = {}
    for row in ("deit_s_cutmix", "deit_s_tlalign"):
        parent = resolve_run_config(params, row, preset="embedded", rows_path=REPO / "experiments" / "rows.yaml",
                                    params_path=REPO / "params.yaml")
        cfg = transfer_config(parent, config_hash(parent), row, "digits", recipe)
        assert cfg["model"] == parent["model"] and cfg["img_size"] == parent["img_size"]
        assert cfg["epochs"] == 15 and cfg["supervision"]["align"] == "none" and cfg["augment"]["mix"] == "none"
        assert cfg["init_from"] == row and cfg["init_from_hash"] == config_hash(parent) and cfg["init_new_head"]
        configs[row] = cfg
    # the pair differs only in what it starts from (and its name)
    strip = lambda c: {k: v for k, v in c.items() if k not in ("row", "init_from", "init_from_hash")}  # noqa: E731
    assert strip(configs["deit_s_cutmix"]) == strip(configs["deit_s_tlalign"])
    with pytest.raises(Exception, match="transfer.train.no_such_key"):
        transfer_config(parent, "h", "deit_s_tlalign", "digits", {"no_such_key": 1})


def _resolved(params, row, preset):
    return resolve_run_config(params, row, preset=preset, rows_path=REPO / "experiments" / "rows.yaml",
                              params_path=REPO / "params.yaml")


@pytest.mark.parametrize("preset", ["embedded-downstream", "imagenet"])
def test_a_fine_tune_row_transfers_with_its_baselines_recipe_not_its_own_schedule(preset):
    """deit_b_tlalign is deit_b_mixup_cutmix fine-tuned at a constant lr 1e-5 and weight decay 1e-8: its transfer takes
    the pre-training run's recipe (the schedule check refused the inherited lr), so the Table 5 pair differs only in
    the weights it starts from."""
    from tlvit.train import check_schedule

    params = load_params(REPO / "params.yaml")
    recipe = params["presets"][preset]["transfer"].get("train") or {}
    if preset == "embedded-downstream":
        recipe = params["presets"]["embedded"]["transfer"]["train"]  # its base's: embedded-downstream sets none
    base, tuned = _resolved(params, "deit_b_mixup_cutmix", preset), _resolved(params, "deit_b_tlalign", preset)
    assert tuned["lr"] < base["lr"] and tuned["init_from"] == "deit_b_mixup_cutmix"  # the bug's premise
    with pytest.raises(ValueError, match="pre-training run"):
        transfer_config(tuned, config_hash(tuned), "deit_b_tlalign", "digits", recipe)
    configs = {"deit_b_mixup_cutmix": transfer_config(base, config_hash(base), "deit_b_mixup_cutmix", "digits", recipe),
               "deit_b_tlalign": transfer_config(tuned, config_hash(tuned), "deit_b_tlalign", "digits", recipe,
                                                 pretrain_cfg=base)}
    strip = lambda c: {k: v for k, v in c.items() if k not in ("row", "init_from", "init_from_hash")}  # noqa: E731
    assert strip(configs["deit_b_mixup_cutmix"]) == strip(configs["deit_b_tlalign"])
    assert configs["deit_b_tlalign"]["init_from_hash"] == config_hash(tuned)  # the weights: the fine-tuned row's
    for cfg in configs.values():
        check_schedule(cfg, cfg["batch_size"])
        assert cfg["lr"] == base["lr"] and cfg["weight_decay"] == base["weight_decay"]


def test_a_fine_tune_at_another_resolution_keeps_its_architecture_and_input_size():
    params = load_params(REPO / "params.yaml")
    base, tuned = (_resolved(params, r, "imagenet") for r in ("lvvit_s_token_labeling", "lvvit_s_token_labeling_384"))
    assert tuned["img_size"] != base["img_size"]
    cfg = transfer_config(tuned, "h", "lvvit_s_token_labeling_384", "cifar10", {}, pretrain_cfg=base)
    assert cfg["img_size"] == tuned["img_size"] and cfg["model"] == tuned["model"]
    assert (cfg["lr"], cfg["epochs"], cfg["batch_size"]) == (base["lr"], base["epochs"], base["batch_size"])


def test_the_pretraining_config_follows_init_from_through_the_checkpoints(tmp_path):
    from tlvit.transfer import pretraining_config

    layout = Layout("p", tmp_path)
    chain = {"a": {"row": "a", "lr": 1e-3}, "b": {"row": "b", "init_from": "a", "lr": 1e-5},
             "c": {"row": "c", "init_from": "b", "lr": 1e-6}}
    for row in ("a", "b"):
        layout.run_dir(row, 2).mkdir(parents=True)
        torch.save({"config": chain[row]}, layout.run_dir(row, 2) / "checkpoint.pt")
    assert pretraining_config(layout, chain["a"], 2) is None  # not a fine-tune
    assert pretraining_config(layout, chain["c"], 2) == chain["a"]  # two levels up, same seed
    with pytest.raises(FileNotFoundError, match="train row 'a' \\(seed 0\\) first"):
        pretraining_config(layout, chain["b"], 0)
    torch.save({"config": {"row": "a", "init_from": "c"}}, layout.run_dir("a", 2) / "checkpoint.pt")
    with pytest.raises(ValueError, match="cycle"):
        pretraining_config(layout, chain["c"], 2)


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """A finished 1-epoch run of a tiny DeiT analog on tiny canvases, laid out as preset `t`'s row `deit_s_cutmix`."""
    root = tmp_path_factory.mktemp("repo")
    data = root / "data" / "t" / "canvases"
    write_canvases(data, CanvasSpec(train=64, val=40, single=4, seed=1))
    params = load_params(REPO / "params.yaml")
    cfg = copy.deepcopy(resolve_run_config(params, "deit_s_cutmix", preset="smoke",
                                           rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml"))
    cfg.update(epochs=1, warmup_epochs=0, batch_size=32, workers=0, model_kwargs={"depth": 1, "embed_dim": 24, "num_heads": 2})
    layout = Layout("t", root)
    torch.set_num_threads(1)
    res = train(cfg, 0, layout.run_dir("deit_s_cutmix", 0), RunInputs(data, "canvases"), tracking=False,
                show_progress=False)
    layout.row_metrics("deit_s_cutmix").parent.mkdir(parents=True)
    layout.row_metrics("deit_s_cutmix").write_text(json.dumps({"runs": [{"seed": 0, "top1": res["top1"]}]}))
    return layout, cfg


def test_a_fine_tune_starts_from_the_parents_weights_with_a_new_classifier(parent_run):
    from tlvit.models import build_model

    layout, parent_cfg = parent_run
    ckpt_path = layout.run_dir("deit_s_cutmix", 0) / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    cfg = transfer_config(ckpt["config"], ckpt["config_hash"], "deit_s_cutmix", "digits", {})
    torch.manual_seed(123)
    model = build_model(cfg, 10)
    fresh_head = model.head.weight.detach().clone()
    load_parent_weights(model, cfg, ckpt_path)
    parent = reported_weights(ckpt)  # what the parent reports: its EMA when it had one
    assert torch.equal(model.blocks[0].attn.qkv.weight, parent["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.head.weight, fresh_head) and not torch.equal(model.head.weight, parent["head.weight"])


def test_the_stage_fine_tunes_every_finished_seed_and_the_table_pairs_them(parent_run):
    layout, _ = parent_run
    section = {"rows": "all", "tasks": ["digits", "cifar10"], "sources": {}, "canvas_size": 64,
               "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "workers": 0}}
    torch.set_num_threads(1)
    table = load_column_table(REPO / "experiments" / "transfer.yaml")
    records = fine_tune_rows(layout, ["deit_s_cutmix"], table, section, lambda r: finished_seeds(layout, r),
                             tracking=False)
    digits = next(r for r in records if r["task"] == "digits")
    assert digits["present"] and [s["seed"] for s in digits["seeds"]] == [0] and 0 <= digits["seeds"][0]["top1"] <= 100
    assert (layout.root / "runs" / "t" / "transfer" / "digits" / "deit_s_cutmix" / "seed0" / "result.json").is_file()
    assert next(r for r in records if r["task"] == "cifar10") == {"row": "deit_s_cutmix", "task": "cifar10",
                                                                  "present": False, "seeds": []}
    # run again: every fine-tune is complete, so it is collected, not retrained (same numbers)
    again = fine_tune_rows(layout, ["deit_s_cutmix"], table, section, lambda r: finished_seeds(layout, r), tracking=False)
    assert again[0]["seeds"][0]["top1"] == digits["seeds"][0]["top1"]
    md = render(table, {"preset": "t", "commit": "abc", "date": "2026-12-02", "rows": records})
    line = next(x for x in md.splitlines() if x.startswith("| DeiT-S |"))
    assert "97.9 / —" not in line and "not present" in line and f"{digits['seeds'][0]['top1']:.2f}" in line


def test_the_table_gives_paired_deltas_over_common_seeds():
    table = load_column_table(REPO / "experiments" / "transfer.yaml")
    rec = lambda row, vals: {"row": row, "task": "digits", "present": True,  # noqa: E731
                             "seeds": [{"seed": s, "top1": v} for s, v in enumerate(vals)]}
    record = {"preset": "e", "commit": "abc", "date": "d",
              "rows": [rec("deit_s_cutmix", [80.0, 82.0, 84.0]), rec("deit_s_tlalign", [81.0, 83.5, 85.0])]}
    md = render(table, record)
    pair = next(x for x in md.splitlines() if x.startswith("| DeiT-S + TL-Align vs DeiT-S |"))
    cells = [c.strip() for c in pair.strip("|").split("|")][1:]
    assert cells[:4] == ["+0.90 / —", "+0.20 / —", "+0.20 / —", "+0.40 / —"]  # the paper's Δ per set; none measured
    assert cells[4] == "— / +1.17 [+0.45, +1.88]"  # digits (no paper value): mean of (1.0, 1.5, 1.0), t-interval


def test_the_stage_outputs_exist_when_there_is_nothing_to_fine_tune(tmp_path):
    """A preset with no task (tiny-imagenet) or none of the table's rows trained (embedded): DVC needs the stage's
    output folders to exist all the same."""
    layout = Layout("p", tmp_path)
    table = load_column_table(REPO / "experiments" / "transfer.yaml")
    assert fine_tune_rows(layout, [], table, {"tasks": []}, lambda r: []) == []
    assert (tmp_path / "runs" / "p" / "transfer").is_dir() and (tmp_path / "data" / "transfer" / "p").is_dir()
