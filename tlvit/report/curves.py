"""Per-epoch training curves of a row: from MLflow when the store answers, else from the row metrics file.

MLflow is read through `tlvit.tracking` (the only module that imports mlflow): its `metric_history`
when that function exists and every seed's run has the key; otherwise the `curves` the train stage
copied into `metrics/<preset>/rows/<row>.json`, which hold the same per-epoch values.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from tlvit.report.results import RowResult

log = logging.getLogger(__name__)

KEYS = ("val_top1", "ema_val_top1", "train_loss")


@dataclass
class Curves:
    """Per-seed series of one key: epochs and values with None where an epoch was not evaluated."""

    key: str
    seeds: list[tuple[list[int], list[float | None]]]
    source: str  # "mlflow" | "metrics"

    def mean(self) -> tuple[list[int], list[float], list[float], list[float]]:
        """(epochs, mean, min, max) over seeds at the epochs every seed has a value for."""
        common = None
        for epochs, values in self.seeds:
            have = {e for e, v in zip(epochs, values) if v is not None}
            common = have if common is None else common & have
        epochs = sorted(common or ())
        per_epoch = [[dict(zip(e, v))[ep] for e, v in self.seeds] for ep in epochs]
        return (epochs, [statistics.fmean(p) for p in per_epoch], [min(p) for p in per_epoch],
                [max(p) for p in per_epoch])


def row_curves(res: RowResult, key: str) -> Curves | None:
    """The curves of `key` for a done row, or None."""
    if not res.done:
        return None
    from_mlflow = _mlflow_curves(res, key)
    if from_mlflow is not None:
        return from_mlflow
    seeds = []
    for c in res.metrics.get("curves") or []:
        values = c.get(key)
        if values and any(v is not None for v in values):
            seeds.append((list(c.get("epoch") or range(1, len(values) + 1)), list(values)))
    return Curves(key, seeds, "metrics") if seeds else None


def _mlflow_curves(res: RowResult, key: str) -> Curves | None:
    from tlvit import tracking

    history = getattr(tracking, "metric_history", None)  # (run_id, key) -> [(step, value)] | None
    run_ids = [run.get("mlflow_run_id") for run in res.runs]
    if history is None or not run_ids or None in run_ids:
        return None
    seeds = []
    try:
        for run_id in run_ids:
            points = history(run_id, key)
            if not points:
                return None
            points = sorted(points)
            seeds.append(([int(s) for s, _ in points], [float(v) for _, v in points]))
    except Exception as e:  # an unreachable store: the metrics file has the same numbers
        log.info("report: MLflow history of %s unavailable (%s); using the metrics file", res.row, e)
        return None
    return Curves(key, seeds, "mlflow")
