"""Train one row: every seed of the preset, then the row's metrics file (the `train@<row>` stage and the
`tlvit launch` job both call :func:`run_row`)."""
from __future__ import annotations

import statistics

from tlvit.config import ConfigError, config_hash, load_params, preset_section, resolve_run_config
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.tables import experiment_for_row
from tlvit.train import RunInputs, train


def run_row(row: str, params_path: str = "params.yaml", rows_path: str = "experiments/rows.yaml",
            show_progress: bool = True) -> dict:
    """Train all seeds of `row` under the params' preset; write and return the row's metrics.

    Seeds whose checkpoints are complete (e.g. trained by a `tlvit launch` job) are only collected.
    """
    params = load_params(params_path)
    cfg = resolve_run_config(params, row, rows_path=rows_path, params_path=params_path)
    layout = Layout(params["preset"])
    data = layout.dataset()
    source = cfg["supervision"]["targets"]
    if source not in ("annotator", "oracle"):
        raise ConfigError(f"{rows_path} row {row!r}: supervision.targets must be 'annotator' or 'oracle', not {source!r}")
    seeds = preset_section(params, params_path=params_path)["seeds"]
    experiment, tags = experiment_for_row(row, params["preset"], params=params, rows_path=rows_path, params_path=params_path)
    runs = []
    for seed in seeds:
        parent_ckpt = layout.run_dir(cfg["init_from"], seed) / "checkpoint.pt" if cfg.get("init_from") else None
        inputs = RunInputs(data["root"], data["kind"], layout.score_maps(source, "train"), init_checkpoint=parent_ckpt)
        runs.append(train(cfg, seed, layout.run_dir(row, seed), inputs, show_progress=show_progress,
                          experiment=experiment, tags=tags))
    metrics = row_metrics(row, params["preset"], config_hash(cfg), runs)
    write_json(layout.row_metrics(row), metrics)
    return metrics


def row_metrics(row: str, preset: str, chash: str, runs: list[dict]) -> dict:
    """The row metrics file from the seeds' `train` results: mean over seeds, per-seed provenance, curves."""
    top1 = [r["top1"] for r in runs]
    return {
        "row": row, "preset": preset, "config_hash": chash, "n_seeds": len(runs),
        "top1": round(statistics.fmean(top1), 3),
        "top1_std": round(statistics.stdev(top1), 3) if len(top1) > 1 else None,
        "runs": [{k: r[k] for k in ("seed", "top1", "top5", "top1_raw", "top1_ema", "mlflow_run_id", "git_commit",
                                    "train_time_s", "images_per_s", "epochs")} | ({"top1_cls_only": r["top1_cls_only"]}
                                    if "top1_cls_only" in r else {}) for r in runs],
        # per-epoch curves: the recorded copy of what MLflow holds. DVC tracks this file, so a changed run re-runs
        # the report; the report draws from MLflow when it can and checks that the two agree.
        "curves": [{"seed": r["seed"], **r["curves"]} for r in runs],
    }
