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
        runs.append(train(cfg, seed, layout.run_dir(row, seed), seed_inputs(layout, data, cfg, seed),
                          show_progress=show_progress, experiment=experiment, tags=tags))
    metrics = row_metrics(row, params["preset"], config_hash(cfg), runs)
    write_row_outputs(layout, row, metrics)
    return metrics


def seed_inputs(layout: Layout, data: dict, cfg: dict, seed: int) -> RunInputs:
    """What one seed's run reads: the dataset, the score maps its targets come from, and a fine-tune's parent
    checkpoint of the same seed."""
    parent = layout.run_dir(cfg["init_from"], seed) / "checkpoint.pt" if cfg.get("init_from") else None
    return RunInputs(data["root"], data["kind"], layout.score_maps(cfg["supervision"]["targets"], "train"),
                     init_checkpoint=parent)


def write_row_outputs(layout: Layout, row: str, metrics: dict) -> None:
    """The row's metrics file (the full record the report reads), its numbers alone (DVC metrics) and its
    per-epoch curves averaged over seeds (DVC plots)."""
    from tlvit.io import atomic_path

    write_json(layout.row_metrics(row), metrics)
    runs = metrics["runs"]

    def mean(key: str):
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.fmean(values), 3) if len(values) == len(runs) and values else None

    summary = {"top1": metrics["top1"], "top1_std": metrics["top1_std"], "top5": mean("top5"),
               "top1_cls_only": mean("top1_cls_only"), "n_seeds": metrics["n_seeds"],
               "train_time_s": round(sum(r.get("train_time_s") or 0.0 for r in runs), 1)}
    write_json(layout.row_summary(row), {k: v for k, v in summary.items() if v is not None})
    keys = ("train_loss", "val_top1", "ema_val_top1", "lr")
    curves = metrics["curves"]
    lines = ["epoch," + ",".join(keys)]
    for i, epoch in enumerate(curves[0]["epoch"] if curves else []):
        cells = []
        for k in keys:
            values = [c[k][i] for c in curves if c.get(k) and i < len(c[k]) and c[k][i] is not None]
            cells.append(f"{statistics.fmean(values):.6g}" if values else "")
        lines.append(f"{epoch}," + ",".join(cells))
    with atomic_path(layout.row_curves(row)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


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
