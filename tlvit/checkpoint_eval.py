"""The checkpoint table's measurements (stage `checkpoints`): released checkpoints evaluated as the papers did (LV-ViT
Tables 8 and 10, TL-Align Table 1), or, on the embedded presets, the pipeline's own trained rows evaluated again
(`tlvit eval` must give back each run's own last validation exactly); params and GMACs of every model as built.
The stages write `metrics/<preset>/{checkpoints,reeval}.json`; `tlvit.checkpoint_table` renders them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import yaml

CHECKPOINTS_FILE = Path("experiments/checkpoints.yaml")


def model_complexity(build: Callable[[], torch.nn.Module], img_size: int) -> tuple[float, float]:
    """(parameters in millions, GMACs of one image's forward) of the model `build` returns, counted on the meta
    device (no memory, no weights) with torch's FlopCounterMode (a multiply-accumulate counts 2 FLOPs there)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, img_size, img_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    params = sum(p.numel() for p in model.parameters())
    return round(params / 1e6, 2), round(counter.get_total_flops() / 2e9, 2)


def load_released(path: str | Path = CHECKPOINTS_FILE) -> dict:
    entries = (yaml.safe_load(Path(path).read_text()) or {}).get("checkpoints") or {}
    for key, e in entries.items():
        missing = [k for k in ("model", "img_size", "file", "top1", "source") if k not in e]
        if missing:
            raise ValueError(f"{path}: checkpoint {key!r} lacks {missing}")
    return entries


def measure_released(entries: dict, folder: str | Path | None, data_root: str | Path | None, *,
                     real_labels: str | None = None, batch_size: int = 128, device: str | None = None) -> list[dict]:
    """Each release: params and GMACs as built (always), and top-1 / ReaL top-1 when its file is in `folder`
    (else `status: not downloaded`: a row without a measured accuracy, never a made-up one)."""
    import timm

    from tlvit.data.datasets import index_split
    from tlvit.evaluate import evaluate_split, load_for_eval

    classes = index_split(data_root, "val")[2] if data_root is not None else None
    out = []
    for key, e in entries.items():
        params_m, gmacs = model_complexity(lambda: timm.create_model(e["model"], img_size=e["img_size"]), e["img_size"])
        row = {"id": key, "model": e["model"], "img_size": e["img_size"], "source": e["source"],
               "paper_top1": e["top1"], "paper_real_top1": e.get("real_top1"), "paper_top5": e.get("top5"),
               "paper_params_m": e.get("params_m"), "paper_gflops": e.get("gflops"), "params_m": params_m,
               "gmacs": gmacs, "paper_inconsistent": e.get("paper_inconsistent")}
        path = Path(folder) / e["file"] if folder else None
        if path is None or not path.is_file():
            row["status"] = f"not downloaded ({e['file']})"
        elif classes is None:
            row["status"] = "no ImageNet val split given"
        else:
            setup = load_for_eval(path, len(classes), e["model"], "imagefolder", e["img_size"])
            res = evaluate_split(setup, data_root, "val", batch_size=batch_size, device=device, real_labels=real_labels)
            row.update(status="evaluated", top1=res["top1"], top5=res["top5"], real_top1=res.get("real_top1"),
                       images=res["images"], inference_rule=res["inference_rule"], images_per_s=res["images_per_s"])
        out.append(row)
    return out


def measure_own_rows(layout, rows: list[str], *, batch_size: int = 256) -> list[dict]:
    """Each trained row's first seed, evaluated again from its checkpoint as `tlvit eval` does, next to the top-1
    its training logged for the same weights (they must agree exactly), with params and GMACs as built."""
    from tlvit.data.datasets import index_split
    from tlvit.evaluate import evaluate_split, load_for_eval
    from tlvit.models.build import build_model

    data = layout.dataset()
    num_classes = len(index_split(data["root"], "train")[2])
    out = []
    for row in rows:
        metrics_file = layout.row_metrics(row)
        if not metrics_file.is_file():
            out.append({"id": row, "status": "not trained"})
            continue
        run = json.loads(metrics_file.read_text())["runs"][0]
        ckpt_path = layout.run_dir(row, run["seed"]) / "checkpoint.pt"
        if not ckpt_path.is_file():
            out.append({"id": row, "status": f"no checkpoint ({ckpt_path})"})
            continue
        setup = load_for_eval(ckpt_path, num_classes, data_kind=data["kind"])
        cfg = setup.config  # the run's config (its img_size, eval split, model) from the one load
        res = evaluate_split(setup, data["root"], cfg.get("eval_split", "val"), batch_size=batch_size, device="cpu")
        params_m, gmacs = model_complexity(lambda: build_model(cfg, num_classes), cfg["img_size"])
        out.append({"id": row, "model": cfg["model"], "img_size": cfg["img_size"], "seed": run["seed"],
                    "status": "evaluated", "trained_top1": run["top1"], "top1": res["top1"], "top5": res["top5"],
                    "top1_cls": res.get("top1_cls"), "trained_top1_cls": run.get("top1_cls_only"),
                    "images": res["images"], "params_m": params_m, "gmacs": gmacs, "source": setup.source})
    return out
