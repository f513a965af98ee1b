"""The bookkeeping of a fine-tune counted in iterations (the segmentation and detection stages): a finished run is read
back, an interrupted one resumes from its checkpoint, a checkpoint of another config in the same folder is set aside,
each run has its MLflow run, and its result.json names the config hash, commit and versions.

Each batch is a function of (seed, iteration) alone (`batch_indices`), so a resumed run draws what an uninterrupted
one would; the torch generator (dropout, the detector's anchor and RoI sampling) is saved with each checkpoint and
given back by `start`, for the caller to restore when its own setup has drawn what it draws.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from tlvit.config import config_hash

log = logging.getLogger(__name__)


def batch_indices(seed: int, it: int, batch: int, n: int) -> np.ndarray:
    """The iteration's sample indices: a function of (seed, iteration) alone, so a resumed run draws the same."""
    from tlvit.data.datasets import hash_seed

    return np.random.default_rng(hash_seed(seed, it)).integers(0, n, size=batch)


class IterationRun:
    """One fine-tune's folder (result.json, checkpoint.pt), its MLflow run and its process group."""

    def __init__(self, cfg: dict, seed: int, run_dir: str | Path, device: str | None = None) -> None:
        from tlvit.distributed import init_distributed

        self.cfg, self.seed, self.run_dir = cfg, seed, Path(run_dir)
        self.chash = config_hash(cfg)
        self.result_path, self.ckpt_path = self.run_dir / "result.json", self.run_dir / "checkpoint.pt"
        self.env = init_distributed()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tracker = None

    def finished(self) -> dict | None:
        """The result of this config and seed if it is already in the folder (read back, not trained again)."""
        if self.result_path.is_file():
            done = json.loads(self.result_path.read_text())
            if done.get("config_hash") == self.chash and done.get("seed") == self.seed:
                return done
        return None

    def start(self, model, optimizer, *, tracking: bool, experiment: str, tags: dict | None):
        """Load this config's checkpoint into model and optimizer (one of another config is set aside, renamed with its
        hash, never continued or overwritten) and open the MLflow run; returns (iteration, saved torch generator state
        or None)."""
        from tlvit.provenance import git_commit
        from tlvit.tracking import open_tracker, supersede_run

        start, rng, supersedes = 0, None, None
        if self.ckpt_path.is_file():
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            if state["config_hash"] == self.chash and state["seed"] == self.seed:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                start, rng = state["iteration"], state["rng"]
                log.info("%s: resumed at iteration %d", self.run_dir, start)
            else:
                supersedes = supersede_run(self.run_dir, state["config_hash"])
                self.ckpt_path.replace(self.run_dir / f"checkpoint.pt.{state['config_hash']}.superseded")
        cfg = self.cfg
        self.tracker = open_tracker(self.run_dir, experiment, f"{cfg['row']} seed {self.seed}", cfg,
                                    {"row": cfg["row"], "seed": self.seed, "config_hash": self.chash,
                                     "git_commit": git_commit(), **(tags or {})},
                                    enabled=tracking and self.env.is_main, supersedes=supersedes)
        return start, rng

    def begin(self, model, *, tracking: bool, experiment: str, tags: dict | None):
        """Move model to the run's device, build its optimizer as tlvit.train does (timm's AdamW, no decay on norms,
        biases and the backbone's no_weight_decay()) and `start`; returns (optimizer, iteration, saved generator)."""
        from timm.optim import create_optimizer_v2

        model.to(self.device)
        optimizer = create_optimizer_v2(model, "adamw", lr=self.cfg["lr"], weight_decay=self.cfg["weight_decay"])
        start, rng = self.start(model, optimizer, tracking=tracking, experiment=experiment, tags=tags)
        return optimizer, start, rng

    def step(self, model, optimizer, loss: torch.Tensor, it: int, *, lr: float, stop: int, every: int,
             parts: dict | None = None) -> int:
        """One optimizer step at learning rate lr on loss; then log (every 50th and the last iteration: the loss, lr
        and `parts`, named loss tensors) and checkpoint (every `every`-th and the last). Returns the next iteration."""
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{self.run_dir}: loss {loss.item()} at iteration {it}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        it += 1
        if it % 50 == 0 or it == stop:
            self.tracker.log_metrics({"train_loss": loss.item(), "lr": lr,
                                      **{k: v.item() for k, v in (parts or {}).items()}}, step=it)
        if it % every == 0 or it == stop:
            self.checkpoint(model, optimizer, it)
        return it

    def parallel(self, model):
        """The model under DistributedDataParallel when torch.distributed runs, else itself."""
        if not self.env.enabled:
            return model
        cuda = self.device.type == "cuda"
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None,
                                                         find_unused_parameters=True)

    def checkpoint(self, model, optimizer, it: int) -> None:
        """Model, optimizer, iteration and torch generator, written atomically (by the main process)."""
        from tlvit.io import save_torch_atomic

        if self.env.is_main:
            save_torch_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                               "rng": torch.get_rng_state(), "config": self.cfg, "config_hash": self.chash,
                               "seed": self.seed}, self.ckpt_path)

    def interrupted(self, it: int) -> dict:
        """The record of a run left before its last iteration (its MLflow run marked KILLED)."""
        self.tracker.finish("KILLED")
        return {"config_hash": self.chash, "seed": self.seed, "iteration": it, "metrics": None}

    def finish(self, it: int, metrics: dict, parent: str) -> dict:
        """Log the metrics, close the MLflow run and write result.json; returns the result."""
        from tlvit.io import write_json
        from tlvit.provenance import git_commit, versions

        self.tracker.log_metrics(metrics, step=it)
        self.tracker.finish()
        result = {"config_hash": self.chash, "seed": self.seed, "iteration": it, "metrics": metrics, "parent": parent,
                  "mlflow_run_id": self.tracker.run_id, "commit": git_commit(), "versions": versions()}
        if self.env.is_main:
            write_json(self.result_path, result)
        return result
