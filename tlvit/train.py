"""Train one row with one seed: build data/model/optimizer from the resolved config, run epochs.

Resumable and deterministic: a checkpoint (atomic) after every epoch; all randomness of epoch e is
derived from (seed, e, rank), so a run killed after epoch k and resumed ends bit-identical to an
uninterrupted one on CPU.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from tlvit.config import config_hash
from tlvit.data.datasets import hash_seed, train_split, val_split
from tlvit.distributed import DistEnv, barrier, init_distributed
from tlvit.engine import TrainForward, evaluate, train_one_epoch
from tlvit.io import atomic_path, save_torch_atomic, write_json
from tlvit.models import build_model, is_pyramid  # noqa: F401  (also tlvit.train.build_model, as before)
from tlvit.provenance import cluster_tags, git_commit, versions
from tlvit.samplers import ShardSampler, train_sampler
from tlvit.supervision import Supervision, needs_score_maps

log = logging.getLogger(__name__)

@dataclass
class RunInputs:
    """Where a run's data lives (resolved by the pipeline stage or the launcher)."""

    data_root: Path
    data_kind: str = "canvases"
    score_maps: Path | None = None  # the train split's store, when the supervision needs one
    init_checkpoint: Path | None = None  # fine-tunes (cfg["init_from"]): the parent run's checkpoint, same seed


def load_parent_weights(model: torch.nn.Module, cfg: dict, path: Path | None) -> None:
    """Start a fine-tune from its parent row's final weights (EMA when it had one), pos-embed resampled."""
    from tlvit.models.lvvit import load_checkpoint_resized

    parent = cfg["init_from"]
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"row {cfg.get('row')!r} fine-tunes row {parent!r}, whose checkpoint {path} does not exist: "
                                f"run `dvc repro train@{parent}` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["config_hash"] != cfg["init_from_hash"] or ckpt["epoch"] != scheduled_epochs(ckpt["config"]):
        raise ValueError(f"{path}: not the finished run of row {parent!r} under this config (hash {ckpt['config_hash']}, "
                         f"epoch {ckpt['epoch']}/{scheduled_epochs(ckpt['config'])}); run `dvc repro train@{parent}` first")
    # init_weights (imagenet key; absent: reported): `model` = the parent's trained weights, as the authors'
    # fine-tune command loads them; `reported` = the weights whose accuracy the parent reports (its EMA if any)
    which = cfg.get("init_weights", "reported")
    if which not in ("reported", "model"):
        raise ValueError(f"row {cfg.get('row')!r}: init_weights {which!r}: use `reported` or `model`")
    weights = reported_weights(ckpt) if which == "reported" else ckpt["model"]
    if cfg.get("init_new_head"):  # transfer to another task: the parent's classifiers are not carried over
        weights = {k: v for k, v in weights.items() if not k.startswith(("head.", "aux_head."))}
    load_checkpoint_resized(model, weights)


def reported_weights(ckpt: dict) -> dict:
    """The weights whose accuracy a run reports: its EMA when it has one (timm's ModelEmaV3 keys are
    prefixed `module.`), else the model's."""
    if not ckpt.get("ema"):
        return ckpt["model"]
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}


def lr_for(cfg: dict, global_batch: int) -> float:
    """Linear scaling rule of LV-ViT Table 2: lr x batch / 1024, or batch / 640 with token labeling."""
    base = cfg["lr_base_batch_token_labeling"] if cfg["supervision"]["kind"] == "token_labeling" else cfg["lr_base_batch"]
    return cfg["lr"] * cfg.get("lr_scale", 1.0) * global_batch / base


def check_schedule(cfg: dict, global_batch: int) -> None:
    """Refuse a schedule that cannot mean what it says: a warm-up as long as the cosine schedule, or an lr
    below min_lr after scaling (the cosine would then climb). `epochs` is the cosine's length; training
    runs epochs + cooldown_epochs (the cool-down holds min_lr, as LV-ViT's code does)."""
    row = cfg.get("row")
    if cfg["warmup_epochs"] >= cfg["epochs"] and cfg["warmup_epochs"] > 0:
        raise ValueError(f"row {row!r}: warmup_epochs {cfg['warmup_epochs']} is not shorter than epochs {cfg['epochs']} "
                         "(the cosine schedule's length); shorten the warm-up or train longer")
    lr = lr_for(cfg, global_batch)
    if lr < cfg["min_lr"] * (1 - 1e-9):
        raise ValueError(f"row {row!r}: the scaled lr {lr:.3g} (lr x lr_scale x batch {global_batch} / base batch) is "
                         f"below min_lr {cfg['min_lr']:.3g}, so the cosine schedule would climb; lower min_lr or raise lr")


def process_batch(cfg: dict, world_size: int) -> int:
    """Each process's share of the recipe's `batch_size`, which is the *global* batch (LV-ViT supplementary
    Table 1: 1024 = the authors' 8 GPUs x 128): the same row computes the same thing on 1, 8 or 64 processes."""
    global_batch = cfg["batch_size"]
    if global_batch % world_size:
        raise ValueError(f"row {cfg.get('row')!r}: batch_size {global_batch} is the global batch and must split evenly "
                         f"over the {world_size} processes; set a multiple of {world_size} or change the process count")
    return global_batch // world_size


def amp_dtype_for(cfg: dict, device: torch.device) -> torch.dtype | None:
    """The config's AMP dtype on a GPU; None (float32) on the CPU, so CPU runs stay exact."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg.get("amp")]


def scheduled_epochs(cfg: dict) -> int:
    """Epochs a run trains: the cosine schedule's, then `cooldown_epochs` at min_lr (timm's train.py, LV-ViT's)."""
    return cfg["epochs"] + cfg.get("cooldown_epochs", 0)


@dataclass
class TrainingState:
    """Everything one training step touches. train() and `tlvit bench step` both build it with
    `build_training_state`, so the benchmark times exactly the step training runs."""

    model: torch.nn.Module
    net: torch.nn.Module  # what the step calls: TrainForward(model), in DDP when distributed
    supervision: Supervision
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm CosineLRScheduler, stepped per update
    num_epochs: int  # epochs to train, cool-down included (timm's count)
    lr: float
    ema: Any = None  # timm ModelEmaV3
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    clip_grad: float | None = None

    def step_kwargs(self) -> dict:
        """The keyword arguments of `train_one_epoch` that the state decides."""
        return {"ema": self.ema, "amp_dtype": self.amp_dtype, "scaler": self.scaler,
                "channels_last": self.channels_last, "clip_grad": self.clip_grad}

    def state_dict(self) -> dict:
        """The checkpointed parts (the step count lives in the scheduler and the EMA)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def build_training_state(cfg: dict, num_classes: int, device: torch.device, *, global_batch: int, steps_per_epoch: int,
                         seed: int, env: DistEnv = DistEnv()) -> TrainingState:
    """Model, supervision, AdamW, cosine schedule (+ cool-down), EMA and AMP of a row, from its resolved config."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    check_schedule(cfg, global_batch)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    # AMP and channels-last only where they pay: on a GPU (the CPU keeps float32, so CPU runs stay exact)
    amp_dtype = amp_dtype_for(cfg, device)
    channels_last = bool(cfg.get("channels_last")) and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    supervision = Supervision.from_config(cfg, num_classes, model.token_grid, pyramid=is_pyramid(model))
    net = TrainForward(model)
    if env.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[env.local_rank] if device.type == "cuda" else None)
    lr = lr_for(cfg, global_batch)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg["weight_decay"])
    # cosine over `epochs`, then held at min_lr for `cooldown_epochs`: timm counts both into num_epochs
    scheduler, num_epochs = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg["epochs"],
                                                warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                                min_lr=cfg["min_lr"], cooldown_epochs=cfg.get("cooldown_epochs", 0),
                                                step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return TrainingState(
        model=model, net=net, supervision=supervision, optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs,
        lr=lr, ema=ModelEmaV3(model, decay=cfg["ema_decay"]) if cfg.get("ema_decay") else None,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,  # fp16 needs loss scaling
        amp_dtype=amp_dtype, channels_last=channels_last, clip_grad=cfg.get("clip_grad"))


def check_run_config(cfg: dict, num_classes: int = 1000) -> None:
    """What the node would find wrong with a resolved config, found here, in a second (before `sbatch`):
    the schedule, the model's constructor arguments (built on the meta device: no memory), the supervision and
    mixing settings, the train transforms. Raises ValueError/TypeError naming the problem."""
    from tlvit.data.datasets import TrainGeometry

    check_schedule(cfg, cfg["batch_size"])
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    Supervision.from_config(cfg, num_classes, model.token_grid, pyramid=is_pyramid(model))
    TrainGeometry(cfg["img_size"], tuple(cfg["crop_scale"]), tuple(cfg["crop_ratio"]), cfg["hflip"],
                  cfg.get("train_interpolation", "bicubic"), None, cfg.get("transform_order", "crop_flip_randaug"))


def evaluates_at(cfg: dict, epoch: int, num_epochs: int) -> bool:
    """Is the val split scored after `epoch` (1-based)? Every `eval_every`-th epoch, the last one, and every one
    of the last `eval_last_epochs` (where a long val split is scored only where convergence is judged)."""
    return (epoch % cfg.get("eval_every", 1) == 0 or epoch == num_epochs
            or epoch > num_epochs - cfg.get("eval_last_epochs", 0))


def train(cfg: dict, seed: int, run_dir: str | Path, inputs: RunInputs, **kwargs) -> dict:
    """Train (or resume) one run; returns its final metrics (also written to `<run_dir>/result.json`).

    One process per run folder and rank: a second trainer on the same folder (e.g. after the `dvc repro`
    that started the first was killed, leaving it running) stops with one clear line instead of writing
    into the first one's checkpoints. Keyword arguments: see `_train`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    with open(run_dir / f".train.rank{rank}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir}: another process is training this run (rank {rank}); wait for it to "
                               "finish or stop it (e.g. `fuser -k` on its .train.*.lock), then run again") from None
        return _train(cfg, seed, run_dir, inputs, **kwargs)


def _train(cfg: dict, seed: int, run_dir: Path, inputs: RunInputs, *, device: str | None = None,
           tracking: bool = True, experiment: str | None = None, tags: dict | None = None,
           show_progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """stop_after_epochs: return after that many epochs in total (tests of resume); the run stays resumable."""
    from timm.utils import ModelEmaV3

    from tlvit.tracking import open_tracker, supersede_run

    env = init_distributed()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chash = config_hash(cfg)
    sup_cfg = cfg["supervision"]

    # ---------------------------------------------------------------- data
    uses_maps = needs_score_maps(sup_cfg["kind"], sup_cfg["cls_target"])
    store = inputs.score_maps if uses_maps else None
    if uses_maps and store is None:
        raise ValueError(f"row {cfg.get('row')!r}: supervision {sup_cfg['kind']!r} needs score maps; none given")
    train_ds = train_split(cfg, inputs.data_root, inputs.data_kind, score_maps=store)
    val_ds = val_split(cfg, inputs.data_root, inputs.data_kind, classes=train_ds.classes)
    num_classes = len(train_ds.classes)

    # ---------------------------------------------------------------- model, supervision, optimizer
    sampler = train_sampler(train_ds, cfg, env, seed)
    global_batch, batch = cfg["batch_size"], process_batch(cfg, env.world_size)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{inputs.data_root}/train: {len(train_ds)} images give no full batch of {global_batch}")
    state = build_training_state(cfg, num_classes, dev, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                                 seed=seed, env=env)
    model, lr, num_epochs = state.model, state.lr, state.num_epochs
    modes = ("cls_plus_aux", "cls") if state.supervision.dense else ("cls",)

    # ---------------------------------------------------------------- resume
    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, history, time_before = 0, [], 0.0  # time_before: training time of earlier (killed) attempts
    ended_at = None  # when the last epoch was saved: the MLflow run's end, also when collected later
    trained_at_commit = None  # the commit whose code trained the checkpoint's last epoch
    superseded = None  # the MLflow run of an older config of this folder
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if ckpt["config_hash"] == chash and ckpt["seed"] == seed:
            state.load_state_dict(ckpt)
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            time_before = ckpt.get("train_time_s", 0.0)
            ended_at = ckpt.get("saved_at")
            trained_at_commit = ckpt.get("git_commit")
            log.info("resuming %s from epoch %d", run_dir, start_epoch)
        else:  # a different config left this: keep it aside rather than resume into the wrong run
            ckpt_path.rename(run_dir / f"checkpoint.{ckpt['config_hash']}.stale.pt")
            if env.is_main:  # and its MLflow run: this training gets a new one
                superseded = supersede_run(run_dir, ckpt["config_hash"])
    if start_epoch == 0 and cfg.get("init_from"):
        load_parent_weights(model, cfg, inputs.init_checkpoint)
        if state.ema is not None:
            state.ema = ModelEmaV3(model, decay=cfg["ema_decay"])  # the average starts from the loaded weights

    # the commit that trains; a run only collected here (its checkpoint complete) keeps the one that trained it
    commit = trained_at_commit if trained_at_commit and start_epoch >= num_epochs else git_commit()
    run_tags = {"row": cfg.get("row"), "preset": cfg.get("preset"), "config_hash": chash, "seed": seed,
                "git_commit": commit, **versions(), **cluster_tags(), **(tags or {})}
    tracker = open_tracker(run_dir, experiment or f"tlvit-{cfg.get('preset')}", f"{cfg.get('row')}-s{seed}",
                           {**cfg, "seed": seed, "lr_effective": lr, "global_batch": global_batch}, run_tags,
                           enabled=tracking and env.is_main, supersedes=superseded)

    # ---------------------------------------------------------------- epochs
    t_start, trained_s = time.time(), time_before
    end_epoch = num_epochs if stop_after_epochs is None else min(num_epochs, stop_after_epochs)
    with _closed_on_failure(tracker):  # a run that dies is FAILED or KILLED in MLflow, not left RUNNING
        for epoch in range(start_epoch, end_epoch):
            torch.manual_seed(hash_seed(seed, epoch, env.rank))  # drop-path; augmentation is seeded per sample
            train_ds.set_epoch(seed, epoch)
            sampler.set_epoch(epoch)
            loader_gen = torch.Generator().manual_seed(hash_seed(seed, epoch, env.rank))  # worker seeds
            loader = DataLoader(train_ds, batch_size=batch, sampler=sampler, num_workers=cfg["workers"],
                                generator=loader_gen, drop_last=True, pin_memory=dev.type == "cuda")
            mix_gen = torch.Generator().manual_seed(hash_seed(seed, epoch))  # same mixing draw on every rank
            stats = train_one_epoch(state.net, model, loader, state.supervision, state.optimizer, state.scheduler, epoch, dev,
                                    generator=mix_gen, last_checkpoint=str(ckpt_path) if epoch else "none",
                                    show_progress=show_progress and env.is_main, **state.step_kwargs())
            if evaluates_at(cfg, epoch + 1, num_epochs):
                val_loader = DataLoader(val_ds, batch_size=256, sampler=ShardSampler(len(val_ds), env), num_workers=cfg["workers"])
                stats.update({f"val_{k}": v for k, v in evaluate(model, val_loader, dev, modes, state.amp_dtype).items()})
                if state.ema is not None:
                    stats.update({f"ema_val_{k}": v for k, v in evaluate(state.ema.module, val_loader, dev, modes,
                                                                          state.amp_dtype).items()})
            stats["epoch"] = epoch + 1
            history.append(stats)
            trained_s = time_before + time.time() - t_start
            tracker.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch + 1)
            ended_at = time.time()
            if env.is_main:
                save_torch_atomic({**state.state_dict(), "epoch": epoch + 1, "history": history, "config_hash": chash,
                                   "seed": seed, "config": cfg, "train_time_s": trained_s, "saved_at": ended_at,
                                   "git_commit": commit}, ckpt_path)
            barrier()
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()})

    done = len(history) == num_epochs
    last = history[-1] if history else {}
    prefix = "ema_val_" if state.ema is not None else "val_"
    result = {
        "top1": last.get(f"{prefix}top1"), "top5": last.get(f"{prefix}top5"),
        "top1_raw": last.get("val_top1"), "top1_ema": last.get("ema_val_top1"),
        "epochs": len(history), "complete": done, "seed": seed, "config_hash": chash,
        "mlflow_run_id": tracker.run_id, "git_commit": run_tags["git_commit"], "train_time_s": round(trained_s, 1),
        "images_per_s": last.get("images_per_s"), "lr_effective": lr, "global_batch": global_batch,
    }
    result["curves"] = {k: [h.get(k) for h in history] for k in ("epoch", "train_loss", "val_top1", "ema_val_top1", "lr")}
    if state.supervision.dense:
        result["top1_cls_only"] = last.get(f"{prefix}top1_cls")
    if env.is_main:
        _write_history(run_dir / "history.csv", history)
        write_json(run_dir / "result.json", result)
    tracker.set_tags({"complete": done})
    if done:
        tracker.finish("FINISHED", end_time=ended_at)
    return result


@contextlib.contextmanager
def _closed_on_failure(tracker) -> Iterator[None]:
    """FAILED on an error (NaN loss, exception), KILLED on Ctrl-C or SIGTERM (when nobody else, e.g. submitit,
    handles SIGTERM); a resumed run is RUNNING again (`tlvit.tracking.Tracker`)."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if own_handler:
        signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_history(path: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
