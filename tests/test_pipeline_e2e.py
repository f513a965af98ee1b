"""The whole pipeline, for real: `dvc repro` of the smoke preset in a temporary git + DVC repository."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from repo_copy import committed_copy, ran_stages, set_preset, sh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> tuple[Path, dict]:
    """A committed copy of this repository with `preset: smoke`."""
    return committed_copy(tmp_path_factory.mktemp("repo"), lambda text: set_preset(text, "smoke"))


def test_smoke_repro_end_to_end(smoke_repo, tmp_path):
    repo, env = smoke_repo
    # a user's first "what would run?" on a fresh clone, before any output exists
    status = sh(["dvc", "status"], repo, env).stdout
    assert "data:" in status and "train@lvvit_s_token_labeling:" in status
    first = sh(["dvc", "repro"], repo, dict(env, TLVIT_RECORD_IMPORTS=str(tmp_path / "imports")))
    stages = ran_stages(first.stdout)
    assert {"data", "annotator", "scoremaps", "train@lvvit_s_baseline", "train@lvvit_s_token_labeling", "checkpoints", "reeval",
            "robustness", "transfer", "segmentation", "detection", "report"} <= set(stages)

    # every repository module a stage loaded is one of its deps, so editing it re-runs the stage
    import yaml

    declared, uncovered = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"], {}
    for name, stage in declared.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split("-m pipeline.")[1].split()[0]
        loaded = json.loads((tmp_path / "imports" / f"{module}.json").read_text())
        deps = [d for d in stage["deps"] if isinstance(d, str)]
        # the package markers: a version string, and run_stage's error wrapper; neither changes an output
        missing = [f for f in loaded if f not in ("tlvit/__init__.py", "pipeline/__init__.py")
                   and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
        if missing:
            uncovered[name] = missing
    assert not uncovered, f"dvc.yaml stages run these modules without listing them in their deps: {uncovered}"

    # the report: both rows with a reproduced number and their provenance, and a real PNG
    table = (repo / "reports" / "smoke" / "lvvit_table3.md").read_text()
    for label in ("+ Enhanced residual connection", "+ Token labeling"):
        line = next(line for line in table.splitlines() if label in line)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d\d", cells[2]), line  # reproduced top-1
        assert re.fullmatch(r"[0-9a-f]{12}", cells[6]), line  # commit
    provenance = (repo / "reports" / "smoke" / "provenance.csv").read_text().splitlines()
    for row in ("lvvit_s_baseline", "lvvit_s_token_labeling"):
        line = next(line for line in provenance if line.startswith(f"{row},done,"))
        assert re.search(r",[0-9a-f]{32},[0-9a-f]{40},[0-9a-f]{12},[0-9a-f]{12}$", line), line  # run, commit, hashes
    with Image.open(repo / "reports" / "smoke" / "figures" / "lvvit_table3.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200
    assert "lvvit_table3.md" in (repo / "reports" / "smoke" / "README.md").read_text()
    # stage `reeval`: each row's checkpoint scored again by `tlvit eval` gives its training-time top-1 exactly
    record = json.loads((repo / "metrics" / "smoke" / "reeval.json").read_text())
    assert {r["id"] for r in record["rows"]} == {"lvvit_s_baseline", "lvvit_s_token_labeling"}
    for r in record["rows"]:
        assert r["status"] == "evaluated" and r["top1"] == r["trained_top1"] and r["gmacs"] > 0, r
    assert "| +0.00 |" in (repo / "reports" / "smoke" / "checkpoints.md").read_text()
    # stage `robustness` (TL-Align Table 6): the embedded analogues of V2/A/C/R and AutoAttack, for every trained row
    # (smoke: `rows: all`); the clean top-1 it measures is the run's own, and the attack never raises accuracy
    record = json.loads((repo / "metrics" / "smoke" / "robustness.json").read_text())
    assert {r["row"] for r in record["rows"]} == {"lvvit_s_baseline", "lvvit_s_token_labeling"}
    trained_rows = ("lvvit_s_baseline", "lvvit_s_token_labeling")
    trained = {r["seed"]: r["top1"] for r in json.loads((repo / "metrics" / "smoke" / "rows" / "lvvit_s_baseline.json")
                                                         .read_text())["runs"]}
    for r in record["rows"]:
        assert all(r["sets"].values()), r["sets"]
        for s in r["seeds"]:
            assert {"val", "v2", "a", "r", "c", "autoattack"} <= set(s) and s["c_kind"] == "mean_error", s
            assert len(s["c_per_corruption"]) == 15 and s["autoattack_images"] == 8
            assert s["autoattack"] <= s["autoattack_clean"]
            if r["row"] == "lvvit_s_baseline":
                assert s["val"] == pytest.approx(trained[s["seed"]], abs=1e-9)
    assert "TL-Align Table 6" in (repo / "reports" / "smoke" / "tlalign_table6.md").read_text()
    # stage `transfer` (TL-Align Table 5): every trained row's seeds fine-tuned on scikit-learn's digits (smoke: `rows:
    # all`, one epoch), each an ordinary tlvit run under runs/smoke/transfer/
    record = json.loads((repo / "metrics" / "smoke" / "transfer.json").read_text())
    assert {(r["row"], r["task"]) for r in record["rows"]} == {("lvvit_s_baseline", "digits"),
                                                               ("lvvit_s_token_labeling", "digits")}
    for r in record["rows"]:
        assert r["present"] and sorted(s["seed"] for s in r["seeds"]) == sorted(trained)
        assert all(0 <= s["top1"] <= 100 and s["epochs"] == 1 for s in r["seeds"])
        for s in r["seeds"]:
            assert (repo / "runs" / "smoke" / "transfer" / "digits" / r["row"] / f"seed{s['seed']}" / "result.json").is_file()
    table5 = (repo / "reports" / "smoke" / "tlalign_table5.md").read_text()
    assert "TL-Align Table 5" in table5 and "digits paper / reproduced" in table5

    # stage `segmentation` (LV-ViT slides Tables 5-6, TL-Align Table 3): every trained row's seeds with both heads
    # (smoke: `rows: all`, a few iterations) on the canvases' maps, scored single- and multi-scale
    record = json.loads((repo / "metrics" / "smoke" / "segmentation.json").read_text())
    assert record["present"] and record["dataset"] == "canvases"
    assert {(r["row"], r["head"]) for r in record["runs"]} == {(row, head) for row in trained_rows
                                                               for head in ("fcn", "upernet")}
    for r in record["runs"]:
        assert sorted(s["seed"] for s in r["seeds"]) == sorted(trained)
        for s in r["seeds"]:
            assert all(0 <= s[k] <= 100 for k in ("miou", "pacc", "macc", "miou_ms", "pacc_ms", "macc_ms")), s
            result = repo / "runs" / "smoke" / "segmentation" / r["head"] / r["row"] / f"seed{s['seed']}" / "result.json"
            assert json.loads(result.read_text())["iteration"] == 6
    slides5 = (repo / "reports" / "smoke" / "lvvit_slides_table5.md").read_text()
    line = next(x for x in slides5.splitlines() if x.startswith("| LV-ViT-S + UperNet + token labeling |"))
    seed0 = next(r for r in record["runs"] if r["row"] == "lvvit_s_token_labeling" and r["head"] == "upernet")["seeds"][0]
    assert f"{seed0['miou']:.2f}" in line and "47.9" in line  # reproduced next to the paper's

    # stage `detection` (TL-Align Table 4's analogue): every trained row's seeds (smoke: `rows: all`) as Mask R-CNN
    # backbones on the canvases' digits, box and mask AP
    record = json.loads((repo / "metrics" / "smoke" / "detection.json").read_text())
    assert record["present"] and record["dataset"] == "canvases"
    assert sorted(r["row"] for r in record["rows"]) == sorted(trained_rows)
    for r in record["rows"]:
        assert sorted(s["seed"] for s in r["seeds"]) == sorted(trained)
        for s in r["seeds"]:
            assert all(0 <= s[k] <= 100 for k in ("ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask",
                                                  "ap75_mask")), s
            result = repo / "runs" / "smoke" / "detection" / r["row"] / f"seed{s['seed']}" / "result.json"
            assert json.loads(result.read_text())["iteration"] == 4
    table4 = (repo / "reports" / "smoke" / "tlalign_table4.md").read_text()
    assert "TL-Align Table 4" in table4 and "| Swin-T | 50.40 / — |" in table4  # no Swin row trained in smoke

    # MLflow holds both runs with params and one metric point per epoch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    rows = {r.data.tags["row"]: r for r in runs if "tlvit.mirror_of" not in r.data.tags
            and "transfer_task" not in r.data.tags and "segmentation_head" not in r.data.tags
            and "detection_head" not in r.data.tags}
    assert set(rows) == {"lvvit_s_baseline", "lvvit_s_token_labeling"}
    fine_tunes = client.search_runs([client.get_experiment_by_name("tlvit-smoke-tlalign_table5").experiment_id])
    assert {r.data.tags["row"] for r in fine_tunes} == {"lvvit_s_baseline@digits", "lvvit_s_token_labeling@digits"}
    segmenters = client.search_runs([client.get_experiment_by_name("tlvit-smoke-segmentation").experiment_id])
    assert sorted(r.data.tags["row"] for r in segmenters) == sorted(f"{row}+{head}" for row in trained_rows
                                                                    for head in ("fcn", "upernet"))
    assert all(r.info.status == "FINISHED" and r.data.metrics["miou"] >= 0 for r in segmenters)
    detectors = client.search_runs([client.get_experiment_by_name("tlvit-smoke-detection").experiment_id])
    assert sorted(r.data.tags["row"] for r in detectors) == sorted(f"{row}+mask_rcnn" for row in trained_rows)
    assert all(r.info.status == "FINISHED" and r.data.metrics["ap_box"] >= 0 for r in detectors)
    # every table's experiment holds every row of it (a run's copies in its row's other tables' experiments)
    for row, run in rows.items():
        for table in run.data.tags["tables"].split(","):
            exp = client.get_experiment_by_name(f"tlvit-smoke-{table}")
            assert exp is not None and any(r.data.tags["row"] == row for r in client.search_runs([exp.experiment_id])), \
                (row, table)
    for r in rows.values():
        assert r.info.status == "FINISHED"
        assert r.data.params["supervision.kind"] in ("ce", "token_labeling")
        assert len(client.get_metric_history(r.info.run_id, "val_top1")) == 2  # smoke: 2 epochs
        assert r.data.tags["config_hash"] and r.data.tags["git_commit"] != "unknown"

    # DVC's own views: numbers only in `dvc metrics show`, the curves in `dvc plots show` (offline HTML)
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    values = {f: d["data"] for f, d in next(iter(shown.values()))["data"].items()}
    summary = values["metrics/smoke/summary/lvvit_s_token_labeling.json"]
    assert {"top1", "top5", "top1_cls_only", "n_seeds"} <= set(summary)
    summaries = {f: d for f, d in values.items() if "/summary/" in f}
    assert len(summaries) == 2 and all(isinstance(v, (int, float)) for d in summaries.values() for v in d.values())
    sh(["dvc", "plots", "show", "--out", str(tmp_path / "plots")], repo, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "metrics/smoke/curves/lvvit_s_baseline.csv" in html and "ema_val_top1" in html
    assert "lvvit_table3_claims" in html and "tlalign_table8_claims" in html  # the Δ bars' data

    # a second repro runs nothing; editing a row's description (a YAML comment) re-trains nothing (the report,
    # which reads the whole file, re-renders)
    second = sh(["dvc", "repro"], repo, env)
    assert ran_stages(second.stdout) == []
    rows_yaml = repo / "experiments" / "rows.yaml"
    described = "  # LV-ViT-S architecture (16 blocks"
    assert described in rows_yaml.read_text()
    rows_yaml.write_text(rows_yaml.read_text().replace(described, "  # Reworded: LV-ViT-S architecture (16 blocks", 1))
    assert ran_stages(sh(["dvc", "repro"], repo, env).stdout) == ["report"]

    # the annotator re-run alone writes byte-identical outputs (its timings go to the metrics file only), so
    # neither the score maps nor a row re-run; the report does, as it quotes the annotator's training time
    sh(["dvc", "repro", "--force", "--single-item", "annotator"], repo, env)
    assert ran_stages(sh(["dvc", "repro"], repo, env).stdout) == ["report"]
    speeds = json.loads((repo / "metrics" / "smoke" / "annotator.json").read_text())["train_images_per_s"]
    assert speeds and all(v > 0 for v in speeds)

    # changing one row re-runs only that row and the report
    rows_yaml.write_text(rows_yaml.read_text().replace("    supervision.kind: ce\n", "    supervision.kind: ce\n    label_smoothing: 0.2\n"))
    third = sh(["dvc", "repro"], repo, env)
    assert sorted(ran_stages(third.stdout)) == ["detection", "reeval", "report", "robustness", "segmentation",
                                                "train@lvvit_s_baseline", "transfer"]


def test_unknown_row_fails_clearly_and_keeps_outputs(smoke_repo):
    repo, env = smoke_repo
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the end-to-end run above")
    params = repo / "params.yaml"
    original = params.read_text()
    listed = "rows:\n- lvvit_s_baseline\n- lvvit_s_token_labeling\n"
    assert listed in original
    params.write_text(original.replace(listed, listed + "- no_such_row\n"))
    try:
        p = sh(["dvc", "repro"], repo, env, check=False)
        assert p.returncode != 0
        assert re.search(r"no_such_row.*missing from 'experiments/rows.yaml'", p.stderr), p.stderr  # DVC's own check
        # the stage itself, run by hand, says the same and what to do (one line, no traceback)
        stage = sh([sys.executable, "-m", "pipeline.train", "--row", "no_such_row"], repo, env, check=False)
        assert stage.returncode == 2 and "Traceback" not in stage.stderr
        assert "experiments/rows.yaml: unknown row 'no_such_row'; define it there" in stage.stderr
        # nothing already computed was lost
        assert (repo / "metrics" / "smoke" / "rows" / "lvvit_s_baseline.json").is_file()
        assert any((repo / "runs" / "smoke" / "lvvit_s_token_labeling").rglob("checkpoint.pt"))
    finally:
        params.write_text(original)
    assert ran_stages(sh(["dvc", "repro"], repo, env).stdout) == []


def test_tiny_imagenet_runs_the_imagenet_recipe_end_to_end(tmp_path_factory):
    """A user's first ImageNet-shaped run: WordNet-id folders of non-square JPEGs, a local resnet18 annotator
    checkpoint, the imagenet preset's recipe at a tiny scale; the report says it is a subset run."""
    repo, env = committed_copy(tmp_path_factory.mktemp("tiny"), lambda text: set_preset(text, "tiny-imagenet"))
    sh(["tlvit", "tiny-imagenet"], repo, env)
    stages = ran_stages(sh(["dvc", "repro"], repo, env).stdout)
    assert {"data", "annotator", "scoremaps", "train@lvvit_s_baseline", "train@lvvit_s_token_labeling", "checkpoints",
            "report"} <= set(stages)
    dataset = json.loads((repo / "data" / "tiny-imagenet" / "dataset.json").read_text())
    assert dataset["kind"] == "imagefolder" and dataset["splits"] == {"train": 40, "val": 20}
    # the store covers each whole image: its index keeps the (non-square) sizes the crops are fractions of
    index = json.loads((repo / "scoremaps" / "tiny-imagenet" / "annotator" / "train" / "index.json").read_text())
    assert any(w != h for w, h in index["sizes"])
    readme = (repo / "reports" / "tiny-imagenet" / "README.md").read_text()
    assert "**Subset run** (classes 5 < 1,000" in readme
    # no released file in the folder: every checkpoint row says so, with the paper's numbers and none measured
    released = json.loads((repo / "metrics" / "tiny-imagenet" / "checkpoints.json").read_text())["rows"]
    assert released and all(r["status"].startswith("not downloaded") and "top1" not in r for r in released)
    metrics = json.loads((repo / "metrics" / "tiny-imagenet" / "rows" / "lvvit_s_token_labeling.json").read_text())
    assert metrics["runs"][0]["seed"] == 42 and metrics["runs"][0]["top1"] is not None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = {r.data.tags["row"]: r.data.params for r in runs}
    assert params["lvvit_s_baseline"]["augment.mix"] == "mixup"  # standard supervision: MixUp 0.8
    assert params["lvvit_s_token_labeling"]["transform_order"] == "flip_randaug_crop"
    assert ran_stages(sh(["dvc", "repro"], repo, env).stdout) == []


def test_score_maps_launched_as_shards_are_recorded_by_the_stage(tmp_path_factory):
    """`tlvit launch --scoremaps N`: N jobs fill the stores (the last publishes each); the persisted `scoremaps`
    stage then finds them for its settings and records them without recomputing."""
    repo, env = committed_copy(tmp_path_factory.mktemp("shards"), lambda text: set_preset(text, "smoke"))
    early = sh(["tlvit", "launch", "--scoremaps", "3", "--kind", "local"], repo, env, check=False)
    assert early.returncode == 2 and "must run before the score maps: `dvc repro" in early.stderr
    sh(["dvc", "repro", "annotator"], repo, env)
    out = sh(["tlvit", "launch", "--scoremaps", "3", "--kind", "local"], repo, env).stdout
    assert "submitted 3 score-map shard job(s)" in out
    store = repo / "scoremaps" / "smoke" / "annotator" / "train"
    index = json.loads((store / "index.json").read_text())
    assert index["num_images"] == 600 and not store.with_name("train.partial").exists()
    inode = (store / "logits.npy").stat().st_ino
    stages = ran_stages(sh(["dvc", "repro", "scoremaps"], repo, env).stdout)
    assert stages == ["scoremaps"]
    assert (store / "logits.npy").stat().st_ino == inode  # found, not rewritten
    assert json.loads((repo / "metrics" / "smoke" / "scoremaps.json").read_text())["grid"] == index["grid"]
