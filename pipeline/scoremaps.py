"""Stage `scoremaps`: the annotator applied densely to every train/val image -> top-k stores.

Embedded: also the oracle store (ground-truth maps as a perfect annotator) and the annotator's
dense-label accuracy against the ground truth.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from pipeline import run_stage
from tlvit.annotate import annotate_split
from tlvit.config import load_params
from tlvit.data.canvases import BACKGROUND, load_gt_maps
from tlvit.io import write_json
from tlvit.labels.annotator import dense_label_accuracy
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
    layout = Layout(params["preset"])
    data = layout.dataset()
    num_classes = json.loads((layout.annotator_dir / "annotator.json").read_text())["num_classes"]
    metrics = {}
    for split in ("train", "val"):
        # a store a `tlvit launch --scoremaps` array published for these settings is found, not recomputed
        store = annotate_split(split, args.params)
        metrics["bytes_per_image"] = store.bytes_per_image()
        metrics["grid"] = list(store.grid)
        if data["kind"] == "canvases":
            gt_paths, gt_maps, gt_labels = load_gt_maps(data["root"], split, expect_paths=store.index["paths"])
            acc = dense_label_accuracy(store, gt_maps, gt_labels, num_classes)
            metrics.update({f"{split}_{k}": v for k, v in acc.items()})
            write_oracle_store(layout, split, num_classes, gt_paths, gt_maps, gt_labels)
    write_json(layout.metrics_dir / "scoremaps.json", metrics)
    print("scoremaps:", json.dumps({k: v for k, v in metrics.items() if "class" not in k}))


if __name__ == "__main__":
    run_stage(main)
