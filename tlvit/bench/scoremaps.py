"""Item 3: score-map generation images/s, and bytes per image in the store.

Times the real `generate_score_maps` (load, resize, annotator forward, top-k, chunked write, index)
over the fixture's train split with the preset's annotator architecture, input size, top-k and
batch size; repeated, the median reported. Bytes per image: the store's arrays per image, and the
whole store directory on disk divided by its images. For the imagenet preset (NFNet-F6 at 576 px,
18x18, top-5, 1000 classes) the size is computed, not measured (no ImageNet or NFNet weights here).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from tlvit.bench.common import Bench, Stopwatch, column, interleave, markdown_table, summary
from tlvit.bench.fixture import build_annotator_for, ensure_canvases, quiet_progress, workdir_or_temp
from tlvit.labels.score_maps import class_dtype

IMAGENET_TRAIN_IMAGES = 1_281_167


def store_bytes(k: int, grid: tuple[int, int], num_classes: int) -> int:
    """Array bytes per image: fp16 logits + class ids in the store's class dtype."""
    return int(k * grid[0] * grid[1] * (2 + class_dtype(num_classes).itemsize))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(out_dir: str | Path, *, quick: bool = False, preset: str = "embedded", workdir: str | Path | None = None,
        images: int | None = None, repeats: int | None = None, device: str | None = None,
        paths: tuple[Path, Path] | None = None) -> dict:
    """Generate the store `repeats` times (after one untimed run); images/s is the median."""
    from tlvit.bench.data import loader_config
    from tlvit.data.datasets import DenseLabelDataset, WholeImageGeometry
    from tlvit.labels.annotator import generate_score_maps
    from tlvit.labels.score_maps import ScoreMapStore
    from tlvit.data.datasets import DATA_STATS

    sections, _ = loader_config(preset, paths)
    ann, cfg = sections["annotator"], sections["scoremaps"]
    images = images or (64 if quick else 2048)
    repeats = repeats or (1 if quick else 5)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = Bench("scoremaps", out_dir, quick=quick, device=str(dev))
    with workdir_or_temp(workdir) as wd:
        root = ensure_canvases(wd, sections, images)
        mean, std = DATA_STATS["canvases"]
        ds = DenseLabelDataset(root, "train", WholeImageGeometry(ann["input_size"]), mean, std)
        model = build_annotator_for(sections, len(ds.classes), dev)
        info: dict = {}

        def generate() -> dict[str, float]:
            out = wd / "bench-store"
            shutil.rmtree(out, ignore_errors=True)
            with quiet_progress(), Stopwatch(torch.cuda.synchronize if dev.type == "cuda" else None) as sw:
                generate_score_maps(model, ds, out, k=cfg["topk"], batch_size=cfg["batch_size"], device=dev,
                                    meta={"annotator": ann["model"] + " (random weights, benchmark)",
                                          "input_size": ann["input_size"]})
            store = ScoreMapStore(out)
            info.update(grid=list(store.grid), k=int(store.index["k"]), num_classes=store.num_classes,
                        bytes_per_image=float(store.bytes_per_image()), disk_bytes_per_image=dir_bytes(out) / len(store),
                        class_dtype=str(np.asarray(store.classes[:1]).dtype))
            shutil.rmtree(out)
            return {"wall": len(ds) / sw.seconds, "cpu": len(ds) / sw.cpu_seconds}

        samples = interleave({"generate": generate}, repeats, warmup=0 if quick else 1)
    bench.sample_load()
    rate = summary(column(samples["generate"], "wall"), 1)
    cpu_rate = summary(column(samples["generate"], "cpu"), 1)
    imagenet = {"grid": [18, 18], "k": 5, "num_classes": 1000, "bytes_per_image": store_bytes(5, (18, 18), 1000)}
    imagenet["train_store_gb"] = round(imagenet["bytes_per_image"] * IMAGENET_TRAIN_IMAGES / 1e9, 2)
    results = {"images_per_s": rate, "images_per_cpu_s": cpu_rate, "store": info, "imagenet_computed": imagenet}
    table = markdown_table(("score maps", "annotator", "input", "grid × top-k", "images/s (wall)", "images per CPU-s",
                            "bytes/image (arrays)", "bytes/image (on disk)"), [
        (f"{preset} (measured, {len(ds)} images)", ann["model"], ann["input_size"], f"{info['grid'][0]}×{info['grid'][1]} × {info['k']}",
         f"{rate['median']:.0f}", f"{cpu_rate['median']:.0f}", f"{info['bytes_per_image']:.0f}", f"{info['disk_bytes_per_image']:.0f}"),
        ("imagenet (computed)", "dm_nfnet_f6", 576, "18×18 × 5", "–", "–", f"{imagenet['bytes_per_image']}",
         f"{imagenet['train_store_gb']} GB for the train split")])
    settings = {"preset": preset, "images": len(ds), "repeats": repeats, "batch_size": cfg["batch_size"], "topk": cfg["topk"],
                "annotator": ann["model"], "annotator_weights": "random (speed and size do not depend on them)",
                "input_size": ann["input_size"], "device": str(dev), "torch_threads": torch.get_num_threads(),
                "timed": "tlvit.labels.annotator.generate_score_maps, whole call (load, resize, forward, top-k, write)"}
    return bench.finish(settings=settings, results=results, tables=[table])
