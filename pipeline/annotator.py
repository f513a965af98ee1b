"""Stage `annotator`: train the embedded annotator, or resolve pretrained weights (NFNet-F6 on ImageNet)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline import run_stage
from tlvit.config import ConfigError, load_params, preset_section
from tlvit.data.canvases import load_gt_maps
from tlvit.data.datasets import DATA_STATS, DenseLabelDataset, EvalGeometry, TrainGeometry, index_split
from tlvit.io import save_torch_atomic, write_json
from tlvit.labels.annotator import build_annotator, cell_targets, dense_logits, file_sha256, image_accuracy, train_annotator
from tlvit.layout import Layout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    cfg = preset_section(params, params_path=args.params)["annotator"]
    layout = Layout(params["preset"])
    data = layout.dataset()
    mean, std = DATA_STATS[data["kind"]]
    size = cfg["input_size"]
    out = layout.annotator_dir
    out.mkdir(parents=True, exist_ok=True)
    classes = index_split(data["root"], "train")[2]  # ids and their count come from train; val must match
    val = DenseLabelDataset(data["root"], "val", EvalGeometry(size), mean, std, classes=classes)
    num_classes = len(classes)
    torch.manual_seed(cfg["seed"])
    model = build_annotator(cfg["model"], num_classes, cfg["pretrained"], cfg["checkpoint"])
    t0, history = time.time(), []
    targets = cfg.get("targets", "image")
    if targets not in ("image", "composition"):
        raise ConfigError(f"{args.params}: presets.{params['preset']}.annotator.targets must be 'image' or 'composition', "
                          f"not {targets!r}")
    if cfg["epochs"] > 0 and cfg["train_split"]:
        cells = None
        if targets == "composition":
            # whole canvases at their own size: each map location then covers a fixed cell of the label map
            train_ds = DenseLabelDataset(data["root"], cfg["train_split"], EvalGeometry(cfg["train_size"]), mean, std)
            _, gt_maps, _ = load_gt_maps(data["root"], cfg["train_split"], expect_paths=train_ds.paths)
            with torch.no_grad():
                grid = tuple(dense_logits(model.eval(), train_ds[0]["image"][None]).shape[2:])
            cells = cell_targets(gt_maps, grid)
        else:
            # crops (not whole images): the annotator must label what is under each location, not the image
            geometry = TrainGeometry(cfg["train_size"], tuple(cfg["crop_scale"]), hflip=0.0)
            train_ds = DenseLabelDataset(data["root"], cfg["train_split"], geometry, mean, std)
        history = train_annotator(model, train_ds, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                                  weight_decay=cfg["weight_decay"], seed=cfg["seed"], dense=cfg["dense_loss"], cells=cells)
    weights = out / "model.pth"
    save_torch_atomic(model.state_dict(), weights)
    top1 = image_accuracy(model, val, device=None)  # a GPU when there is one
    meta = {"model": cfg["model"], "num_classes": num_classes, "input_size": size, "weights": str(weights),
            "weights_sha256": file_sha256(weights), "trained_on": cfg["train_split"] if history else None,
            "targets": targets if history else None,
            "source": "trained here" if history else ("checkpoint " + str(cfg["checkpoint"]) if cfg["checkpoint"] else "timm pretrained")}
    # Timings go to the metrics file only: annotator.json is part of the stage's output, which the score-map
    # stage depends on, so a speed in it would re-run that stage after every annotator run although the
    # weights are byte-identical.
    speeds = [epoch.pop("images_per_s") for epoch in history]
    write_json(out / "annotator.json", {**meta, "history": history})
    write_json(layout.metrics_dir / "annotator.json", {"val_top1": round(top1, 3), "train_time_s": round(time.time() - t0, 1),
                                                        "epochs": len(history),
                                                        "train_images_per_s": [round(v, 1) for v in speeds]})
    print(f"annotator: {cfg['model']} val top-1 {top1:.2f}% -> {weights}")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    run_stage(main)
