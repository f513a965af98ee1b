"""`tlvit bench [step|data|scoremaps|segmentation|detection|repro|fine-tunes|gpu|all] [--quick] [--out DIR]`: the harness's
speed (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

WHICH = ("step", "data", "scoremaps", "segmentation", "detection", "repro", "fine-tunes", "gpu", "all")
ALL = ("step", "data", "scoremaps", "segmentation", "detection", "repro", "gpu")  # fine-tunes: hours, asked for by name


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the harness's speed (targets ✓/✗, JSON per benchmark)",
                       description="Measure the harness's speed side by side: each benchmark prints a table with its "
                                   "targets (✓/✗) and writes <out>/<name>.json (date, machine, device, torch, commit). "
                                   "Latest results: docs/benchmarks.md.")
    p.add_argument("which", nargs="?", choices=WHICH, default="all",
                   help="step: training-step cost per supervision; data: loader with vs without score maps; "
                        "scoremaps: generation speed and store size; segmentation: fine-tune cost per backbone and "
                        "head; detection: Mask R-CNN fine-tune cost per backbone; repro: `dvc repro` wall times; "
                        "fine-tunes: a preset's transfer/segmentation/detection stages unit by unit, resumable; "
                        "gpu: harness vs plain PyTorch loop on a GPU (skipped without one); all (default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round: checks that it runs, numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the JSON records (default: %(default)s)")
    p.add_argument("--preset", default=None,
                   help="params.yaml preset for step/data/scoremaps (default: embedded on the CPU, imagenet on a GPU)")
    p.add_argument("--device", default=None, help="step/scoremaps/gpu device (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="step/data/gpu batch (default: the preset's; 128 on a GPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: per benchmark)")
    p.add_argument("--repro-presets", nargs="+", default=["smoke"],
                   help="presets `repro` runs from clean (the embedded one takes ~30 min on 2 cores)")
    p.add_argument("--repro-all-rows", action="store_true",
                   help="repro: train the rows of the tables the preset is for (`tlvit rows --write` in the copy); with "
                        "--repro-presets embedded-full that is the whole run, 7.0 h on 2 CPU cores (targets: <= 8 h on CPU, <= 1 h on a GPU)")
    p.add_argument("--repro-workdir", type=Path, default=None,
                   help="repro: keep each preset's copy in this folder; a later call with the same folder (and --out) "
                        "resumes an interrupted run, each stage's time summed over its attempts")
    p.add_argument("--ledger", type=Path, default=None,
                   help="fine-tunes: the TSV of measured units, appended to and resumed from "
                        "(default: <out>/fine-tunes-<preset>.tsv)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="fine-tunes: start no unit after this many minutes (a session's share)")
    p.add_argument("--stages", nargs="+", default=None, choices=("transfer", "segmentation", "detection"),
                   help="fine-tunes: the stages to time (default: all three)")
    p.add_argument("--peak-tflops", type=float, default=None, help="gpu: the GPU's dense bf16 peak, for MFU on unknown GPUs")
    p.add_argument("--workdir", type=Path, default=None, help="data/scoremaps: where to build the benchmark dataset (default: a temp dir)")
    p.add_argument("--data", type=Path, default=None, help="data: an ImageFolder root to load instead of built canvases")
    p.add_argument("--score-maps", type=Path, default=None, help="data: the score-map store of --data's train split")
    p.add_argument("--strict", action="store_true", help="exit 1 when a measured target is missed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from tlvit.bench.fixture import BenchDataError, workdir_or_temp
    from tlvit.config import ConfigError
    from tlvit.data.datasets import DatasetError
    from tlvit.labels.score_maps import ScoreMapError

    which = list(ALL) if args.which == "all" else [args.which]
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    preset = args.preset or ("imagenet" if on_gpu else "embedded")
    data_preset = args.preset or "embedded"  # loader and score maps need a dataset built here: embedded canvases
    records = []
    try:
        with workdir_or_temp(args.workdir) as wd:  # one benchmark dataset for data and scoremaps
            records = _run_all(args, which, wd, preset, data_preset, on_gpu)
    except (BenchDataError, ConfigError, DatasetError, ScoreMapError) as e:  # errors that name the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    missed = [t["name"] for r in records for t in r["targets"] if t["met"] is False]
    print(f"\n{len(records)} benchmark(s); targets missed: {', '.join(missed) if missed else 'none'}")
    return 1 if args.strict and missed else 0


def _run_all(args: argparse.Namespace, which: list[str], wd: Path, preset: str, data_preset: str, on_gpu: bool) -> list[dict]:
    records = []
    for name in which:
        if name == "step":
            from tlvit.bench import step

            records.append(step.run(args.out, quick=args.quick, preset=preset, device=args.device,
                                    batch_size=args.batch_size, rounds=args.rounds))
        elif name == "data":
            from tlvit.bench import data

            records.append(data.run(args.out, quick=args.quick, preset=data_preset, workdir=wd, data_root=args.data,
                                    score_maps=args.score_maps, batch_size=args.batch_size, rounds=args.rounds))
        elif name == "scoremaps":
            from tlvit.bench import scoremaps

            records.append(scoremaps.run(args.out, quick=args.quick, preset=data_preset, workdir=wd,
                                         repeats=args.rounds, device=args.device))
        elif name == "segmentation":
            from tlvit.bench import segmentation

            records.append(segmentation.run(args.out, quick=args.quick, preset=data_preset, workdir=wd,
                                            device=args.device))
        elif name == "detection":
            from tlvit.bench import detection

            records.append(detection.run(args.out, quick=args.quick, preset=data_preset, workdir=wd, device=args.device))
        elif name == "repro":
            from tlvit.bench import repro

            records.append(repro.run(args.out, quick=args.quick, presets=tuple(args.repro_presets),
                                     all_rows=args.repro_all_rows, workdir=args.repro_workdir))
        elif name == "fine-tunes":
            from tlvit.bench import fine_tunes

            records.append(fine_tunes.run(args.out, preset=args.preset or "embedded-downstream", workdir=args.workdir,
                                          ledger=args.ledger, stages=tuple(args.stages or fine_tunes.STAGES),
                                          budget_min=args.budget_min))
        elif name == "gpu":
            from tlvit.bench import gpu

            # item 1 on the GPU: its own step_gpu.json, unless `step` already ran on the GPU in this call
            records.append(gpu.run(args.out, quick=args.quick, device=args.device if on_gpu else None,
                                   batch_size=args.batch_size, rounds=args.rounds, peak_tflops=args.peak_tflops,
                                   with_step="step" not in which))
    return records
