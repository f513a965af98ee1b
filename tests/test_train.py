"""The training loop on a tiny real dataset: determinism, exact resume, every supervision, clear failures."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tlvit.config import load_params, resolve_run_config
from tlvit.data.canvases import CanvasSpec, write_canvases
from tlvit.engine import NonFiniteLoss
from tlvit.train import RunInputs, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """96 train / 32 val canvases and an oracle score-map store (ground-truth maps as top-1)."""
    from tlvit.data.canvases import load_gt_maps
    from tlvit.labels.score_maps import ScoreMapWriter

    root = tmp_path_factory.mktemp("tiny") / "canvases"
    write_canvases(root, CanvasSpec(train=96, val=32, single=4, seed=1))
    paths, maps, labels = load_gt_maps(root, "train")
    classes = np.where(maps == 255, labels[:, None, None], maps).astype(np.uint8)[:, None]
    store = root.parent / "oracle"
    w = ScoreMapWriter(store, num_images=len(paths), k=1, grid=maps.shape[1:], num_classes=10, meta={}, chunk=len(paths))
    w.write_chunk(0, np.zeros(classes.shape, np.float16), classes)
    w.finish(paths, [(64, 64)] * len(paths))
    return RunInputs(root, "canvases", store)


def tiny_cfg(kind: str = "ce", mix_token: bool = False, epochs: int = 3, **extra) -> dict:
    cfg = resolve_run_config(load_params(REPO / "params.yaml"), "lvvit_s_baseline", preset="smoke",
                             rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml")
    cfg = copy.deepcopy(cfg)
    cfg.update(epochs=epochs, batch_size=32, warmup_epochs=1 if epochs > 1 else 0, workers=0, model_kwargs={"depth": 1, "embed_dim": 24, "num_heads": 2})
    cfg["supervision"]["kind"] = kind
    cfg["augment"]["mix_token"] = mix_token
    for key, value in extra.items():  # section__key=value
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def test_same_seed_same_metrics_and_exact_resume(tiny_data, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg("token_labeling", mix_token=True)
    full = train(cfg, 0, tmp_path / "full", tiny_data, tracking=False, show_progress=False)
    again = train(cfg, 0, tmp_path / "again", tiny_data, tracking=False, show_progress=False)
    assert full["complete"] and full["epochs"] == 3
    assert full["curves"] == again["curves"]  # bit-identical per-epoch losses and accuracies
    # killed after epoch 1, resumed: the same numbers as the uninterrupted run
    partial = train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False, stop_after_epochs=1)
    assert not partial["complete"] and partial["epochs"] == 1
    resumed = train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False)
    assert resumed["curves"] == full["curves"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed is another run
    other = train(cfg, 1, tmp_path / "other", tiny_data, tracking=False, show_progress=False)
    assert other["curves"]["train_loss"] != full["curves"]["train_loss"]
    # a finished run re-invoked trains nothing and returns the same result
    assert train(cfg, 0, tmp_path / "full", tiny_data, tracking=False, show_progress=False)["curves"] == full["curves"]


@pytest.mark.parametrize("kind,mix,extra", [
    ("ce", False, {}), ("relabel", False, {}), ("relabel", True, {}), ("token_labeling", False, {}),
    ("relabel", False, {"augment__mix": "cutmix"}),  # LV-ViT Table 6: CutMix + re-labeling
    ("token_labeling", False, {"augment__mix": "cutmix"}),
    ("ce", False, {"augment__mix": "mixup", "augment__mix_alpha": 0.8}),
    ("ce", False, {"augment__mix": "cutmix_patch", "supervision__align": "all"}),  # TL-Align
    ("ce", False, {"augment__mix": "cutmix", "supervision__align": "last"}),  # TransMix-like
    ("ce", False, {"rand_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}),
    ("token_labeling", True, {"rand_augment": "rand-m9-mstd0.5-inc1"}),
])
def test_every_supervision_trains(tiny_data, tmp_path, kind, mix, extra):
    top = {k: v for k, v in extra.items() if "__" not in k}
    cfg = tiny_cfg(kind, mix, epochs=1, **{k: v for k, v in extra.items() if "__" in k})
    cfg.update(top)
    res = train(cfg, 0, tmp_path / kind, tiny_data, tracking=False, show_progress=False)
    assert res["complete"] and np.isfinite(res["curves"]["train_loss"][0]) and 0 <= res["top1"] <= 100
    assert ("top1_cls_only" in res) == (kind == "token_labeling")
    saved = json.loads((tmp_path / kind / "result.json").read_text())
    assert saved["config_hash"] == res["config_hash"]


def test_changed_config_does_not_resume_a_stale_checkpoint(tiny_data, tmp_path):
    cfg = tiny_cfg(epochs=1)
    train(cfg, 0, tmp_path / "r", tiny_data, tracking=False, show_progress=False)
    cfg2 = dict(cfg, label_smoothing=0.3)
    res = train(cfg2, 0, tmp_path / "r", tiny_data, tracking=False, show_progress=False)
    assert res["epochs"] == 1 and res["config_hash"] != tiny_cfg(epochs=1) and list((tmp_path / "r").glob("checkpoint.*.stale.pt"))


def test_non_finite_loss_names_step_samples_and_checkpoint(tiny_data, tmp_path):
    cfg = tiny_cfg(epochs=2)
    cfg["lr"] = 1e30  # the first AdamW step makes the weights ~1e30: the next loss is not finite
    with pytest.raises(NonFiniteLoss, match=r"epoch 1 step [23]/3 \(sample ids \[\d+.*last good checkpoint: none"):
        train(cfg, 0, tmp_path / "nan", tiny_data, tracking=False, show_progress=False)


def test_token_labeling_without_score_maps_fails_clearly(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="needs score maps"):
        train(tiny_cfg("token_labeling"), 0, tmp_path / "x", RunInputs(tiny_data.data_root), tracking=False)


def test_fine_tune_starts_from_the_finished_parent_at_a_new_resolution(tiny_data, tmp_path):
    from tlvit.config import config_hash
    from tlvit.train import build_model, load_parent_weights

    parent = tiny_cfg(epochs=1)
    child = dict(parent, img_size=96, init_from="parent", init_from_hash=config_hash(parent), row="child")
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro train@parent` first"):
        train(child, 0, tmp_path / "child", RunInputs(tiny_data.data_root, "canvases", None, tmp_path / "none.pt"),
              tracking=False, show_progress=False)
    train(parent, 0, tmp_path / "parent", tiny_data, tracking=False, show_progress=False)
    ckpt = tmp_path / "parent" / "checkpoint.pt"
    model = build_model(child, 10)
    load_parent_weights(model, child, ckpt)
    ema = {k.removeprefix("module."): v for k, v in torch.load(ckpt, weights_only=False)["ema"].items()}
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape[1] == 1 + 12 * 12 and torch.equal(model.pos_embed[0, 0], ema["pos_embed"][0, 0])
    res = train(child, 0, tmp_path / "child", RunInputs(tiny_data.data_root, "canvases", None, ckpt),
                tracking=False, show_progress=False)
    assert res["complete"]
    with pytest.raises(ValueError, match="not the finished run"):
        load_parent_weights(model, dict(child, init_from_hash="0" * 12), ckpt)
    # init_weights: model (the authors' fine-tune) loads the trained weights, not their average
    plain = torch.load(ckpt, weights_only=False)["model"]
    assert not torch.equal(plain["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    load_parent_weights(model, dict(child, init_weights="model"), ckpt)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], plain["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="init_weights 'ema'"):
        load_parent_weights(model, dict(child, init_weights="ema"), ckpt)


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_dies_is_not_left_running_in_mlflow(tiny_data, tmp_path, monkeypatch, error, status):
    from mlflow.tracking import MlflowClient

    import tlvit.train as train_mod

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    real, calls = train_mod.train_one_epoch, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(type(error)):
        train(tiny_cfg("ce", epochs=3), 0, tmp_path / "run", tiny_data, show_progress=False)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert MlflowClient(uri).get_run(run_id).info.status == status
    monkeypatch.setattr(train_mod, "train_one_epoch", real)  # resumed: the same run, RUNNING, then FINISHED
    result = train(tiny_cfg("ce", epochs=3), 0, tmp_path / "run", tiny_data, show_progress=False)
    assert result["mlflow_run_id"] == run_id and MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_a_changed_config_trains_into_a_new_mlflow_run(tiny_data, tmp_path, monkeypatch):
    """Editing a row and re-training must not log into the old run: a new run, the old one tagged superseded."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    first = train(tiny_cfg("ce", epochs=2), 0, tmp_path / "run", tiny_data, show_progress=False)
    cfg = tiny_cfg("ce", epochs=2)
    cfg["label_smoothing"] = 0.0
    second = train(cfg, 0, tmp_path / "run", tiny_data, show_progress=False)
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    client = MlflowClient(uri)
    old, new = client.get_run(first["mlflow_run_id"]), client.get_run(second["mlflow_run_id"])
    assert old.data.params["label_smoothing"] == "0.1" and new.data.params["label_smoothing"] == "0.0"
    assert old.data.tags["config_hash"] == first["config_hash"] != new.data.tags["config_hash"]
    assert old.data.tags["superseded_by"] == new.info.run_id and new.data.tags["supersedes"] == old.info.run_id
    assert [m.step for m in client.get_metric_history(old.info.run_id, "val_top1")] == [1, 2]  # one training only
    assert old.info.run_name.endswith("(superseded)") and not new.info.run_name.endswith("(superseded)")
    # collected again later (what the DVC stage does after a cluster job): the run keeps its training time
    import time

    ended = new.info.end_time
    time.sleep(1.5)
    import tlvit.train as train_mod

    monkeypatch.setattr(train_mod, "git_commit", lambda *a, **k: "f" * 40)  # the repository moved on meanwhile
    again = train(cfg, 0, tmp_path / "run", tiny_data, show_progress=False)
    run = client.get_run(again["mlflow_run_id"])
    assert again["mlflow_run_id"] == new.info.run_id and run.info.status == "FINISHED"
    assert abs(run.info.end_time - ended) < 1000  # not the collection time, 1.5 s later
    # and its commit is the one that trained it, not the one that collected it
    assert again["git_commit"] == second["git_commit"] != "f" * 40 and run.data.tags["git_commit"] == second["git_commit"]


def test_a_second_trainer_on_the_same_run_folder_stops(tiny_data, tmp_path):
    """A trainer left running (its `dvc repro` parent killed) holds the folder: a second one refuses it."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".train.rank0.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another process is training this run"):
            train(tiny_cfg("ce", epochs=1), 0, run, tiny_data, tracking=False, show_progress=False)
    assert not (run / "checkpoint.pt").exists()
    assert train(tiny_cfg("ce", epochs=1), 0, run, tiny_data, tracking=False, show_progress=False)["complete"]


def test_tlvit_eval_gives_a_runs_own_last_validation_exactly(tiny_data, tmp_path, capsys, monkeypatch):
    """`tlvit eval` on a training checkpoint: the run's model, crop and reported (EMA) weights, so both inference
    rules' numbers equal what training logged for its last epoch; the evaluation is an MLflow run of its own."""
    import json

    from mlflow.tracking import MlflowClient

    from tlvit.cli import main

    res = train(tiny_cfg("token_labeling", mix_token=True, epochs=2), 0, tmp_path / "run", tiny_data, tracking=False,
                show_progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(tiny_data.data_root),
                 "--batch-size", "256", "--out", str(out), "--record-dir", str(tmp_path / "record")]) == 0
    got = json.loads(out.read_text())
    assert got["top1"] == res["top1"] and got["top1_cls"] == res["top1_cls_only"] and got["top5"] == res["top5"]
    assert got["inference_rule"] == "cls_plus_aux" and got["images"] == 32 and "EMA weights" in got["source"]
    run = MlflowClient(uri).get_run(got["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["top1"] == pytest.approx(res["top1"])
    assert run.data.params["split"] == "val" and run.data.tags["kind"] == "eval"
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "tlvit-eval"
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tiny_data.data_root)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_tlvit_eval_reads_imagenet_real_labels_through_timm(tmp_path):
    """A released-style file (`--model`), ILSVRC-named val images and a real.json: ReaL top-1 counts a prediction
    right when it is any of the image's real labels, and images without real labels are left out (timm's rule)."""
    import json

    import timm
    from PIL import Image

    import tlvit.models  # noqa: F401
    from tlvit.evaluate import evaluate_split, load_for_eval

    root = tmp_path / "inet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 1), ("val", 3)):
        for c, wnid in enumerate(("n01", "n02")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                idx = c * n + i + 1
                name = f"ILSVRC2012_val_{idx:08d}.JPEG" if split == "val" else f"{wnid}_{i}.JPEG"
                Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / split / wnid / name)
    torch.manual_seed(0)
    net = timm.create_model("lvvit_t", num_classes=2, img_size=32).eval()
    ckpt = tmp_path / "lvvit_t.pth"
    import argparse

    torch.save({"state_dict_ema": net.state_dict(), "args": argparse.Namespace(lr=1e-3)}, ckpt)  # as timm's train.py
    setup = load_for_eval(ckpt, 2, "lvvit_t", img_size=32)
    plain = evaluate_split(setup, root, batch_size=4)
    # real.json: image 1 accepts both classes, image 2 none (left out), the rest their folder's class
    real = [[0, 1], [], [0], [1], [1], [1]]
    (tmp_path / "real.json").write_text(json.dumps(real))
    with_real = evaluate_split(setup, root, batch_size=4, real_labels=str(tmp_path / "real.json"))
    assert with_real["top1"] == plain["top1"] and with_real["inference_rule"] == "cls_plus_aux"
    ds_preds = []
    from torch.utils.data import DataLoader

    from tlvit.data.datasets import DenseLabelDataset, EvalGeometry
    ds = DenseLabelDataset(root, "val", EvalGeometry(32, setup.crop_pct), setup.mean, setup.std)
    with torch.no_grad():
        for b in DataLoader(ds, batch_size=6):
            o = setup.model.forward_train(b["image"])
            ds_preds += (o.cls_logits + 0.5 * o.token_logits.max(1)[0]).argmax(1).tolist()
    hits = [p in real[i] for i, p in enumerate(ds_preds) if real[i]]
    assert with_real["real_top1"] == pytest.approx(100.0 * sum(hits) / len(hits))


@pytest.mark.parametrize("row,model,small", [
    ("swin_t_mixup_cutmix", "swin_e", {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 16}),
    ("swin_t_tlalign", "swin_e", {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 16}),
    ("pvt_t_tlalign", "pvt_e", {"depths": (1, 1), "num_heads": (1, 2), "embed_dims": (16, 32), "sr_ratios": (2, 1)}),
])
def test_pyramid_rows_train_and_resume_exactly(tiny_data, tmp_path, row, model, small):
    """TL-Align Table 1's Swin and PVT rows as the smoke preset resolves them, made small: they train, their labels
    go through the model (the TL-Align row's loss differs from the same row without alignment), and a run killed
    after one epoch resumes to the same numbers."""
    torch.set_num_threads(1)
    cfg = resolve_run_config(load_params(REPO / "params.yaml"), row, preset="smoke",
                             rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml")
    cfg = copy.deepcopy(cfg)
    cfg.update(epochs=2, batch_size=32, warmup_epochs=1, workers=0, model_kwargs=small)
    assert cfg["model"] == model
    full = train(cfg, 0, tmp_path / "full", tiny_data, tracking=False, show_progress=False)
    assert full["complete"] and all(np.isfinite(full["curves"]["train_loss"])) and "top1_cls_only" not in full
    partial = train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False, stop_after_epochs=1)
    assert partial["epochs"] == 1
    assert train(cfg, 0, tmp_path / "resumed", tiny_data, tracking=False, show_progress=False)["curves"] == full["curves"]
    if cfg["supervision"]["align"] != "none":
        plain = copy.deepcopy(cfg)
        plain["supervision"]["align"] = "none"
        unaligned = train(plain, 0, tmp_path / "plain", tiny_data, tracking=False, show_progress=False)
        assert unaligned["curves"]["train_loss"][0] != full["curves"]["train_loss"][0]
