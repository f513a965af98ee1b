"""`tlvit status`: one table of every row: DVC state, its job, its MLflow run, its latest top-1."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tlvit.config import ConfigError, config_hash, load_params, pipeline_rows, preset_section, resolve_run_config
from tlvit.launch.launcher import dvc_status
from tlvit.launch.records import log_path, pending_reason, poll, read_record
from tlvit.layout import Layout
from tlvit.tracking import ID_FILE, latest_metrics


@dataclass
class RowStatus:
    row: str
    dvc: str          # up to date | stale | ? (dvc failed: e.g. locked by a running `dvc repro`)
    job: str          # "<id> <STATE>" of the row's launch record (a pending Slurm job: "(<squeue reason>)"), or -
    mlflow_run: str   # run id of each seed (first, "+n" for the others), or -
    top1: str         # final mean top-1 (from the row's metrics), or the latest logged value while it trains
    log: str = "-"    # the job's stderr log, where its errors are


def collect(params_path: str | Path = "params.yaml", rows_path: str | Path = "experiments/rows.yaml",
            workdir: str | Path = ".", use_dvc: bool = True) -> list[RowStatus]:
    workdir = Path(workdir)
    params = load_params(workdir / params_path)
    parents = pipeline_rows(params, params_path)
    rows: list[str] = list(parents)
    layout = Layout(params["preset"], workdir)
    seeds = preset_section(params, params_path=params_path)["seeds"]
    stale: set[str] | None = None
    if use_dvc:
        try:
            stale = set(dvc_status(rows, workdir, parents).stale_rows)
        except Exception:
            stale = None
    out = []
    for row in rows:
        try:
            chash = config_hash(resolve_run_config(params, row, rows_path=workdir / rows_path, params_path=params_path))
        except ConfigError:
            out.append(RowStatus(row, "?", "-", "-", "unknown row"))
            continue
        dvc = "?" if stale is None else ("stale" if row in stale else "up to date")
        record = read_record(layout, row)
        job = "-"
        if record is not None:
            try:
                st = poll(record)
                job = f"{record.job_id} {st.state}"
                reason = pending_reason(record.job_id) if record.kind == "slurm" and st.state == "PENDING" else None
                if reason:  # e.g. Resources, or ReqNodeNotAvail for a request no node can hold
                    job += f" ({reason})"
            except Exception as e:  # e.g. no sacct on this machine
                job = f"{record.job_id} ? ({type(e).__name__})"
            if record.config_hash != chash:
                job += " (older config)"
        run_dirs = [layout.run_dir(row, s) for s in seeds]
        ids = [(d / ID_FILE).read_text().strip() for d in run_dirs if (d / ID_FILE).is_file()]
        mlflow_run = "-" if not ids else ids[0] + (f" +{len(ids) - 1}" if len(ids) > 1 else "")
        log = (log_path(record) if record is not None else None) or "-"
        out.append(RowStatus(row, dvc, job, mlflow_run, _top1(layout, row, chash, run_dirs), log))
    return out


def _top1(layout: Layout, row: str, chash: str, run_dirs: list[Path]) -> str:
    metrics_file = layout.row_metrics(row)
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        if m.get("config_hash") == chash and m.get("top1") is not None:
            return f"{m['top1']:.2f}" + (f" ± {m['top1_std']:.2f}" if m.get("top1_std") is not None else "")
    for d in run_dirs:
        key, value, step = latest_metrics(d)
        if value is not None:
            return f"{value:.2f} ({'latest' if step is None else f'epoch {step}'}, seed {d.name.removeprefix('seed')})"
    return "-"


def format_table(rows: list[RowStatus]) -> str:
    header = ("row", "dvc", "job", "mlflow run", "top-1", "log")
    cells = [header] + [(r.row, r.dvc, r.job, r.mlflow_run, r.top1, r.log) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
