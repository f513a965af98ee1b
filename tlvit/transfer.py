"""Transfer learning (TL-Align Table 5): each seed's checkpoint of a trained row fine-tuned on a downstream set.

The paper fine-tunes its ImageNet-trained DeiT-T/S/B, with and without TL-Align, on CIFAR-10/100, Flowers-102 and
Stanford Cars "following existing works" (DeiT's transfer recipe). Here every fine-tune uses one recipe, params
`transfer.train` (dotted keys over the parent's resolved config, as rows.yaml overrides), whatever the parent's
pre-training: a + TL-Align row and its baseline differ only in the weights they start from, and TL-Align is not used
while fine-tuning (class-token cross-entropy, no MixToken). The parent's architecture and input size are kept, its
classifier is replaced by a new one (`init_new_head`), and the weights it reports (its EMA when it had one) are the
start. A parent that is itself a fine-tune (a row with `init_from`, e.g. TL-Align's DeiT-B, fine-tuned 40 epochs at a
constant lr of 1e-5) transfers with the training recipe of the pre-training run it descends from, not its own
fine-tuning one: otherwise its transfer would inherit that schedule (lr, weight decay, warm-up, drop-path) and differ
from its baseline's in more than the weights. A fine-tune is an ordinary tlvit run (resumable, seeded, its own MLflow run) in
runs/<preset>/transfer/<task>/<row>/seed<k>; same parent seed, same fine-tuning seed: the pairs are paired.
"""
from __future__ import annotations

import copy
import json
import logging

from tlvit.config import ConfigError, config_hash, set_dotted

log = logging.getLogger(__name__)

# What a run config says about the network and its input rather than how it was trained: a transfer keeps these from
# the row it starts from, even when the rest of its recipe comes from that row's pre-training run
ARCHITECTURE_KEYS = ("model", "model_kwargs", "img_size")


def transfer_config(parent_cfg: dict, parent_hash: str, row: str, task: str, recipe: dict,
                    where: str = "params.yaml transfer.train", pretrain_cfg: dict | None = None) -> dict:
    """The fine-tune's run config: the parent's (for a fine-tune parent: its pre-training run's `pretrain_cfg` with the
    parent's ARCHITECTURE_KEYS), the recipe's dotted keys set over it, supervision plain."""
    if parent_cfg.get("init_from") and pretrain_cfg is None:
        raise ValueError(f"row {row!r} is a fine-tune of {parent_cfg['init_from']!r}: pass the config of the "
                         "pre-training run it descends from (pretraining_config)")
    cfg = copy.deepcopy(pretrain_cfg if parent_cfg.get("init_from") else parent_cfg)
    for key in ARCHITECTURE_KEYS:
        if key in parent_cfg:
            cfg[key] = copy.deepcopy(parent_cfg[key])
    for key, value in (recipe or {}).items():
        set_dotted(cfg, key, value, where=f"{where}.{key}")
    cfg["supervision"].update(kind="ce", align="none", cls_target="label")
    cfg["augment"]["mix_token"] = False
    cfg["model_kwargs"] = {**(cfg.get("model_kwargs") or {}), "aux_head": False}
    cfg.pop("eval_split", None)  # always the task's val split
    cfg.update(row=f"{row}@{task}", init_from=row, init_from_hash=parent_hash, init_weights="reported",
               init_new_head=True)
    return cfg


def planned_rows(trained: list[str], table: dict, section: dict, params_path: str = "params.yaml") -> list[str]:
    """Rows to transfer: `rows: table5` the table's rows the preset trains; `all` every trained row."""
    which = section.get("rows", "table5")
    if which not in ("table5", "all"):
        raise ConfigError(f"{params_path}: transfer.rows must be `table5` or `all`, not {which!r}")
    return list(trained) if which == "all" else [r["row"] for r in table["rows"] if r["row"] in trained]


def fine_tune_rows(layout, trained: list[str], table: dict, section: dict, seeds_of, *, params_path: str = "params.yaml",
                   tracking: bool = True) -> list[dict]:
    """Fine-tune every seed of the rows to transfer (`rows: table5`: the table's rows the preset trains; `all`: every
    trained row) on every task of `section["tasks"]` present; returns one record per (row, task) with each seed's
    top-1. seeds_of(row): that row's finished seeds (its metrics file)."""
    import torch

    from tlvit.data.transfer_sets import EMBEDDED_TASKS, prepare_task
    from tlvit.train import RunInputs, train

    wanted = planned_rows(trained, table, section, params_path)
    data_root = layout.root / "data" / "transfer" / layout.preset  # apart from data/<preset>, the data stage's output
    runs_root = layout.root / "runs" / layout.preset / "transfer"
    for folder in (data_root, runs_root):  # the stage's outputs exist even when it has nothing to fine-tune
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task in section.get("tasks") or []:
        root = prepare_task(task, data_root, section.get("sources"), canvas_size=int(section.get("canvas_size", 64)))
        kind = "canvases" if task in EMBEDDED_TASKS else "imagefolder"
        for row in wanted:
            seeds = []
            for seed in seeds_of(row):
                if root is None:
                    break
                parent = layout.run_dir(row, seed) / "checkpoint.pt"
                ckpt = torch.load(parent, map_location="cpu", weights_only=True)
                cfg = transfer_config(ckpt["config"], ckpt["config_hash"], row, task, section.get("train") or {},
                                      pretrain_cfg=pretraining_config(layout, ckpt["config"], seed))
                run_dir = runs_root / task / row / f"seed{seed}"
                res = train(cfg, seed, run_dir, RunInputs(root, kind, None, parent), show_progress=False,
                            tracking=tracking, experiment=f"tlvit-{layout.preset}-tlalign_table5",
                            tags={"transfer_task": task, "parent_row": row})
                seeds.append({"seed": seed, "top1": res["top1"], "config_hash": config_hash(cfg),
                              "mlflow_run_id": res.get("mlflow_run_id"), "epochs": res["epochs"]})
                log.info("transfer %s -> %s seed %d: top-1 %.2f", row, task, seed, res["top1"])
            out.append({"row": row, "task": task, "present": root is not None, "seeds": seeds})
    return out


def pretraining_config(layout, cfg: dict, seed: int) -> dict | None:
    """The config of the run a fine-tune's weights were pre-trained by: its `init_from` parents' checkpoints (same
    seed) followed up to one that starts from scratch; None for a run that is not a fine-tune."""
    import torch

    seen = [cfg.get("row", "?")]
    while cfg.get("init_from"):
        if cfg["init_from"] in seen:
            raise ValueError(f"rows {' -> '.join(seen)} -> {cfg['init_from']}: init_from makes a cycle")
        path = layout.run_dir(cfg["init_from"], seed) / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: row {seen[-1]!r} was fine-tuned from it; train row "
                                    f"{cfg['init_from']!r} (seed {seed}) first")
        seen.append(cfg["init_from"])
        cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    return cfg if len(seen) > 1 else None


def finished_seeds(layout, row: str) -> list[int]:
    """The seeds of a row's metrics file (a finished row), or none."""
    path = layout.row_metrics(row)
    if not path.is_file():
        return []
    return [run["seed"] for run in json.loads(path.read_text())["runs"]]
