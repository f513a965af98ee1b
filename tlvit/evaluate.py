"""`tlvit eval`: a checkpoint (this harness's own, or a released file) on an ImageFolder split, as the papers evaluate.

A tlvit training checkpoint carries its resolved config: the model, the eval resize/crop and the weights the run
reports (its EMA when it had one) come from there, so the numbers equal the run's own last validation. Any other
file (the authors' LV-ViT or DeiT releases) is loaded through timm's pretrained-file path with the model's
`pretrained_cfg` (input size, crop, interpolation, mean/std: the authors' evaluation settings).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tlvit.data.datasets import DATA_STATS, DenseLabelDataset, EvalGeometry, index_split
from tlvit.engine import evaluate
from tlvit.labels.annotator import inference_setup


@dataclass
class EvalSetup:
    model: torch.nn.Module
    img_size: int
    crop_pct: float
    mean: tuple
    std: tuple
    source: str  # "tlvit run <row> seed <k> (EMA)" or "file (timm pretrained_cfg of <model>)"
    config: dict | None = None  # a tlvit run's resolved config (None for a released file)


def load_for_eval(checkpoint: str | Path, num_classes: int, model_name: str | None = None,
                  data_kind: str = "imagefolder", img_size: int | None = None,
                  drop_path: float | None = None) -> EvalSetup:
    """The model and its evaluation settings from a checkpoint file (see the module docstring); img_size: evaluate
    at another resolution (the position grid resampled, as for a fine-tune); drop_path: the stochastic-depth rate to
    build it with (a tlvit run's; a fine-tune that trains it further sets its own)."""
    from tlvit.models.build import build_model
    from tlvit.models.lvvit import load_checkpoint_resized
    from tlvit.train import reported_weights

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    # weights only; released timm-trained files also hold their argparse.Namespace (`args`), as timm's loader allows
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # a tlvit run
        cfg = ckpt["config"]
        if model_name and model_name != cfg["model"]:
            raise ValueError(f"{path}: a tlvit checkpoint of model {cfg['model']!r}, not {model_name!r}; drop --model")
        cfg = dict(cfg, img_size=img_size or cfg["img_size"])
        if drop_path is not None:
            cfg["drop_path"] = drop_path
        model = build_model(cfg, num_classes)
        load_checkpoint_resized(model, reported_weights(ckpt))
        mean, std = DATA_STATS[data_kind]
        which = "EMA" if ckpt.get("ema") else "model"
        return EvalSetup(model, cfg["img_size"], cfg.get("crop_pct", 1.0), mean, std,
                         f"tlvit run {cfg.get('row')} seed {ckpt.get('seed')} epoch {ckpt.get('epoch')} ({which} weights)",
                         config=cfg)
    if not model_name:
        raise ValueError(f"{path}: not a tlvit run checkpoint; name its architecture with --model (e.g. lvvit_s)")
    import timm

    import tlvit.models  # noqa: F401  (registers LV-ViT and tlvit's DeiT)

    size = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes), **size)
    cfg = model.pretrained_cfg
    return EvalSetup(model, img_size or cfg["input_size"][-1], cfg.get("crop_pct", 1.0), tuple(cfg["mean"]), tuple(cfg["std"]),
                     f"file, timm pretrained_cfg of {model_name}")


@torch.no_grad()
def evaluate_split(setup: EvalSetup, root: str | Path, split: str = "val", *, batch_size: int = 64,
                   device: str | None = None, real_labels: str | None = None, progress: bool = False) -> dict:
    """Top-1/top-5 (%) of both inference rules where the model has an aux head (`cls_plus_aux` = cls + 0.5 max aux,
    LV-ViT's; `cls` = class token alone), ImageNet-ReaL top-1/top-5 of the first rule with `real_labels` (a
    real.json path, or "timm" for the copy timm ships; timm's RealLabelsImagenet), and throughput.

    Under torchrun (or a Slurm job of several tasks) each process scores every world-th image and the counts
    are summed, so the result equals one process's."""
    from tqdm import tqdm

    from tlvit.distributed import all_reduce_sum, init_distributed
    from tlvit.samplers import ShardSampler

    env = init_distributed()
    size = setup.img_size
    ds = DenseLabelDataset(root, split, EvalGeometry(size, setup.crop_pct), setup.mean, setup.std,
                           classes=index_split(root, "train")[2] if (Path(root) / "train").is_dir() else None)
    if device is None and env.enabled and torch.cuda.is_available():
        device = f"cuda:{env.local_rank}"
    dev, _, workers = inference_setup(device)  # a GPU in bf16 with loader workers when there is one
    model = setup.model.eval().to(dev)
    modes = ("cls_plus_aux", "cls") if getattr(model, "aux_head", None) is not None else ("cls",)
    sampler = ShardSampler(len(ds), env)
    real = None  # timm's RealLabelsImagenet, made at the first batch (its top-k needs the class count)

    def score_real(logits: torch.Tensor) -> None:
        nonlocal real
        if real is None:
            from timm.data import RealLabelsImagenet

            topk = (1, 5) if logits.shape[1] >= 5 else (1,)
            real = RealLabelsImagenet(ds.paths, None if real_labels == "timm" else real_labels, topk=topk)
            real.filenames = [ds.paths[i] for i in sampler.idx]  # this process's shard, in loader order
        real.add_result(logits.float())

    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=dev.type == "cuda")
    batches = tqdm(loader, desc=f"eval {split}", unit="batch", disable=not (progress and env.is_main), leave=False)
    t0 = time.perf_counter()
    stats = evaluate(model, batches, dev, modes, torch.bfloat16 if dev.type == "cuda" else None,
                     on_logits=score_real if real_labels else None)
    seconds = time.perf_counter() - t0
    out = {"images": len(ds), "split": split, "img_size": size, "crop_pct": setup.crop_pct, "source": setup.source,
           "inference_rule": modes[0], "images_per_s": round(len(ds) / seconds, 1), "device": str(dev),
           "processes": env.world_size, **stats}
    if real_labels:
        topk = real.topk if real is not None else (1, 5)
        # correct and scored images per k, summed over processes (ReaL leaves out images without a real label)
        sums = torch.tensor([[sum(real.is_correct[k]), len(real.is_correct[k])] if real else [0, 0] for k in topk],
                            dtype=torch.float64)
        all_reduce_sum(sums)
        out.update({f"real_top{k}": 100.0 * c.item() / n.item() for k, (c, n) in zip(topk, sums) if n.item()})
    return out


def log_to_mlflow(result: dict, record_dir: Path) -> str | None:
    """One MLflow run per evaluation, in the experiment `tlvit-eval` (its settings as params, its numbers as
    metrics, commit and versions as tags), buffered in `record_dir` while the store is unreachable, like a
    training run's (`tlvit sync` sends it later)."""
    from tlvit.provenance import git_commit, versions
    from tlvit.tracking import open_tracker

    params = {k: result[k] for k in ("checkpoint", "data", "split", "img_size", "crop_pct", "source", "inference_rule",
                                     "processes", "device") if k in result}
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in params}
    name = f"eval {Path(result['checkpoint']).name} {result['split']}@{result['img_size']}"
    tracker = open_tracker(record_dir, "tlvit-eval", name, params, {"git_commit": git_commit(), **versions(),
                                                                     "kind": "eval"})
    tracker.log_metrics(metrics, step=0)
    tracker.finish("FINISHED")
    return tracker.run_id


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (tlvit's or a released file) on an ImageFolder split",
                       description=__doc__)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root: <data>/<split>/<class>/<image>")
    p.add_argument("--split", default="val")
    p.add_argument("--model", default=None, help="timm name for a file that is not a tlvit run (e.g. lvvit_s)")
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's (its run, or pretrained_cfg)")
    p.add_argument("--real-labels", default=None, help="ImageNet-ReaL: a real.json, or `timm` for timm's copy")
    p.add_argument("--data-kind", choices=sorted(DATA_STATS), default=None,
                   help="normalisation of a tlvit run (default: canvases for the embedded data, else imagefolder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available (bf16)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--record-dir", type=Path, default=None,
                   help="the MLflow record folder (run id, offline buffer); default: runs/eval/<time>-<checkpoint>")
    p.add_argument("--no-track", action="store_true", help="do not log the evaluation to MLflow")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json
    import sys

    from tlvit.io import write_json

    kind = args.data_kind or ("canvases" if (args.data / f"gt_maps_{args.split}.npz").is_file() else "imagefolder")
    try:
        classes = index_split(args.data, "train" if (args.data / "train").is_dir() else args.split)[2]
        setup = load_for_eval(args.checkpoint, len(classes), args.model, kind, args.img_size)
        result = evaluate_split(setup, args.data, args.split, batch_size=args.batch_size, device=args.device,
                                real_labels=args.real_labels, progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), **result}
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # every process holds the summed result; the first one reports it (torchrun or Slurm tasks)
    if not args.no_track:
        record = args.record_dir or Path("runs") / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.checkpoint.stem}"
        result["mlflow_run_id"] = log_to_mlflow(result, record)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0
