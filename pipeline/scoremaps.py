"""Stage `scoremaps`: the annotator applied densely to every train/val image -> top-k stores.

Embedded: also the oracle store (ground-truth maps as a perfect annotator) and the annotator's
dense-label accuracy against the ground truth.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from pipeline import run_stage
from tlvit.config import load_params, preset_section
from tlvit.data.canvases import BACKGROUND, load_gt_maps
from tlvit.data.datasets import DATA_STATS, DenseLabelDataset, WholeImageGeometry
from tlvit.io import write_json
from tlvit.labels.annotator import build_annotator, dense_label_accuracy, generate_score_maps
from tlvit.labels.score_maps import ScoreMapWriter
from tlvit.layout import Layout


def write_oracle_store(layout: Layout, split: str, num_classes: int, paths: list[str], maps: np.ndarray,
                       labels: np.ndarray) -> None:
    """Ground-truth class maps (`load_gt_maps`) as a k=1 store; background pixels take the image label."""
    classes = np.where(maps == BACKGROUND, labels[:, None, None], maps).astype(np.uint8)[:, None]
    writer = ScoreMapWriter(layout.score_maps("oracle", split), num_images=len(paths), k=1, grid=maps.shape[1:],
                            num_classes=num_classes, meta={"annotator": "oracle (ground-truth maps)"}, chunk=len(paths))
    writer.write_chunk(0, np.zeros(classes.shape, np.float16), classes)
    writer.finish(paths, [maps.shape[1:][::-1]] * len(paths))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)
    cfg = section["scoremaps"]
    layout = Layout(params["preset"])
    data = layout.dataset()
    meta = json.loads((layout.annotator_dir / "annotator.json").read_text())
    model = build_annotator(meta["model"], meta["num_classes"], checkpoint=meta["weights"])
    mean, std = DATA_STATS[data["kind"]]
    metrics = {}
    for split in ("train", "val"):
        ds = DenseLabelDataset(data["root"], split, WholeImageGeometry(meta["input_size"]), mean, std)
        store = generate_score_maps(model, ds, layout.score_maps("annotator", split), k=cfg["topk"], batch_size=cfg["batch_size"],
                                    device=None, meta={"annotator": meta["model"], "checkpoint_sha256": meta["weights_sha256"],
                                          "input_size": meta["input_size"]})
        metrics["bytes_per_image"] = store.bytes_per_image()
        metrics["grid"] = list(store.grid)
        if data["kind"] == "canvases":
            gt_paths, gt_maps, gt_labels = load_gt_maps(data["root"], split, expect_paths=store.index["paths"])
            acc = dense_label_accuracy(store, gt_maps, gt_labels, meta["num_classes"])
            metrics.update({f"{split}_{k}": v for k, v in acc.items()})
            write_oracle_store(layout, split, meta["num_classes"], gt_paths, gt_maps, gt_labels)
    write_json(layout.metrics_dir / "scoremaps.json", metrics)
    print("scoremaps:", json.dumps({k: v for k, v in metrics.items() if "class" not in k}))


if __name__ == "__main__":
    run_stage(main)
