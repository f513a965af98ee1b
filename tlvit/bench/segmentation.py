"""Segmentation fine-tune cost (stage `segmentation`): per backbone and head, seconds per training iteration (the
stage's own `train_segmenter`, with the preset's batch, crop and loader) and per val image (its `evaluate`: sliding
windows at every multi-scale ratio), and the fine-tune they add up to at the preset's iterations and val size.

The backbones are the preset's analogs of LV-ViT-S, DeiT-S, Swin-T and PVT-T built with random weights (time does
not depend on them). Embedded presets only: the canvases are built here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tlvit.bench.common import Bench, Stopwatch, markdown_table
from tlvit.bench.fixture import Repeated, ensure_canvases, workdir_or_temp

ROWS = ("lvvit_s_baseline", "deit_s_cutmix", "swin_t_mixup_cutmix", "pvt_t_mixup_cutmix")


def run(out_dir: str | Path, *, quick: bool = False, preset: str = "embedded", workdir: str | Path | None = None,
        device: str | None = None, iterations: int | None = None, images: int | None = None,
        paths: tuple[Path, Path] | None = None) -> dict:
    from tlvit.bench.step import default_paths
    from tlvit.config import config_hash, load_params, preset_section, resolve_run_config
    from tlvit.data.datasets import DATA_STATS
    from tlvit.data.segmentation_sets import SegmentationSet
    from tlvit.models.build import build_model
    from tlvit.models.segmenter import HEADS
    from tlvit.segmentation import build_segmenter, evaluate, segmentation_config, train_segmenter

    params_path, rows_path = paths or default_paths()
    params = load_params(params_path)
    sections = preset_section(params, preset, params_path)
    section = sections["segmentation"]
    iterations = iterations or (2 if quick else 40)
    images = images or (2 if quick else 100)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    bench = Bench("segmentation", out_dir, quick=quick, device=str(dev))
    val_size = int(sections["data"]["val"])
    results, lines = {}, []
    with workdir_or_temp(workdir) as wd:
        root = ensure_canvases(wd, sections, 64 if quick else 512)
        mean, std = DATA_STATS["canvases"]
        train_set, val_set = (SegmentationSet("canvases", root, s, mean, std) for s in ("train", "val"))
        for row in ROWS:
            cfg = resolve_run_config(params, row, preset=preset, rows_path=rows_path, params_path=params_path)
            torch.manual_seed(0)
            parent = wd / f"parent-{row}.pt"
            torch.save({"config": cfg, "config_hash": config_hash(cfg), "model": build_model(cfg, 10).state_dict(),
                        "ema": None}, parent)
            for head in HEADS:
                seg_cfg = segmentation_config(cfg, config_hash(cfg), row, head, dict(section, iterations=iterations))
                run_dir = wd / f"segmentation-{row}-{head}"
                shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would be read back, not timed
                with Stopwatch(sync) as train_time:  # (with building the model and scoring one val image)
                    train_segmenter(seg_cfg, 0, run_dir, train_set, Repeated(val_set, 1), parent, tracking=False,
                                    device=str(dev))
                model, _ = build_segmenter(seg_cfg, parent, train_set.num_classes)
                with Stopwatch(sync) as eval_time:
                    evaluate(model.to(dev), Repeated(val_set, images),
                             {**seg_cfg["eval"], "crop_size": seg_cfg["augment"]["crop_size"]}, dev)
                per_iter, per_image = train_time.seconds / iterations, eval_time.seconds / images
                total = section["iterations"] * per_iter + val_size * per_image
                results[f"{row}+{head}"] = {"model": cfg["model"], "head": head, "s_per_iteration": per_iter,
                                            "s_per_val_image": per_image, "fine_tune_s": total}
                lines.append((row, cfg["model"], head, f"{1000 * per_iter:.0f}", f"{1000 * per_image:.0f}",
                               f"{total:.0f}"))
    bench.sample_load()
    table = markdown_table(("row", "model", "head", "ms / iteration", "ms / val image",
                            f"fine-tune s ({section['iterations']} it., {val_size} val)"), lines)
    settings = {"preset": preset, "timed_iterations": iterations, "timed_val_images": images,
                "batch_size": section["batch_size"], "crop_size": section["augment"]["crop_size"],
                "scales": section["eval"]["scales"], "flip": section["eval"]["flip"], "device": str(dev),
                "torch_threads": torch.get_num_threads(), "weights": "random (time does not depend on them)"}
    return bench.finish(settings=settings, results=results, tables=[table])
