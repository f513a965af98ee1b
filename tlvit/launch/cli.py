"""`tlvit launch`, `tlvit status`, `tlvit sync`: training rows as cluster jobs (docs/cluster.md)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tlvit.launch.executor import KINDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--rows-file", default="experiments/rows.yaml", help="row definitions (default: experiments/rows.yaml)")

    p = sub.add_parser("launch", parents=[common], help="submit every stale training row as a job, then return",
                       description="Submit one job per stale `train@<row>` / `finetune@<row>` stage (all at once: a Slurm array), record "
                                   "each in runs/<preset>/<row>/launch.json and return. A following `dvc repro` waits "
                                   "for the jobs and records their results without retraining.")
    p.add_argument("--row", action="append", dest="rows", metavar="ROW", help="only this row (repeatable; default: all stale rows)")
    p.add_argument("--kind", choices=KINDS, help="override launcher.kind")
    p.add_argument("--folder", help="override launcher.folder")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a launcher.slurm key for this launch (repeatable; the value is read as YAML), e.g. "
                        "--slurm cpus_per_task=1 to run one row per core of a small node")
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted, submit nothing")
    p.add_argument("--scoremaps", type=int, metavar="N", help="instead of rows: fill the preset's score-map stores with "
                   "N array tasks (each every N-th chunk; docs/cluster.md), then `dvc repro` records them")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("pool", parents=[common], help="train the preset's unfinished runs here, N single-threaded at once",
                       description="Train every unfinished (row, seed) run of the preset's `rows` and `finetunes` (or "
                                   "of --row) with N worker processes of one torch thread each, longest first; then "
                                   "`dvc repro` records them without retraining. On a small CPU machine this does more "
                                   "work per hour than `dvc repro`, which trains one run at a time (docs/cluster.md).")
    p.add_argument("--row", action="append", dest="rows", metavar="ROW", help="only this row (repeatable)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPU count)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs in the order they would start")
    p.set_defaults(func=cmd_pool)

    p = sub.add_parser("status", parents=[common], help="one table of all rows: DVC state, job, MLflow run, top-1")
    p.add_argument("--no-dvc", action="store_true", help="skip `dvc status` (faster; the dvc column shows ?)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", parents=[common], help="send metrics buffered while MLflow was unreachable",
                       description="Replay every run folder's offline MLflow buffer (runs/<preset>/*/seed*/ by default) "
                                   "to MLFLOW_TRACKING_URI, creating runs that could not be created and closing "
                                   "finished ones.")
    p.add_argument("run_dirs", nargs="*", type=Path, help="run folders (default: all of the preset's)")
    p.set_defaults(func=cmd_sync)


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a launcher.slurm key), got {text!r}")
    return key.strip(), yaml.safe_load(value)


def cmd_launch(args: argparse.Namespace) -> int:
    from tlvit.config import ConfigError, load_params, pipeline_rows
    from tlvit.launch.executor import load_launcher_config
    from tlvit.launch.launcher import launch_rows, plan_launch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.scoremaps is not None:
        return cmd_launch_scoremaps(args)
    try:
        params = load_params(args.params)
        launcher = load_launcher_config(params, kind=args.kind, folder=args.folder, slurm_overrides=dict(args.slurm),
                                        params_path=args.params)
        all_rows = list(pipeline_rows(params, args.params))
        unknown = sorted(set(args.rows or []) - set(all_rows))
        if unknown:
            raise ConfigError(f"{args.params}: rows {unknown} are not in `rows` or `finetunes` {all_rows} "
                              "(DVC has no stage for them)")
        submit, skipped = plan_launch(params, args.rows or all_rows, ".", args.rows_file, args.params)
    except (ConfigError, RuntimeError) as e:  # RuntimeError: `dvc status` failed (e.g. locked by a running repro)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row, why in skipped:
        print(f"  {row}: not submitted ({why})")
    if not submit:
        print("nothing to launch")
        return 0
    if args.dry_run:
        opts = launcher.slurm.executor_parameters(f"tlvit-{params['preset']}") if launcher.kind == "slurm" else {}
        print(f"would submit {len(submit)} row(s) with launcher.kind={launcher.kind} {opts}: {', '.join(submit)}")
        return 0
    try:
        records = launch_rows(submit, params_path=args.params, rows_path=args.rows_file, launcher=launcher)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        print(f"  {r.row}: {r.kind} job {r.job_id}" + (f" {r.state}" if r.state else "") + f"  (logs: {r.folder.replace('%j', r.job_id)})")
    failed = [r.row for r in records if r.state == "FAILED"]
    print("next: `dvc repro` waits for these jobs and records their results; `tlvit status` shows progress")
    return 1 if failed else 0


def cmd_pool(args: argparse.Namespace) -> int:
    from tlvit.config import ConfigError, load_params
    from tlvit.launch.pool import plan_pool, run_pool

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        params = load_params(args.params)
        runs = plan_pool(params, args.rows, args.params, args.rows_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("nothing to train: every run is complete (`dvc repro` records them)")
        return 0
    if args.dry_run:
        for r in runs:
            print(f"  {r.row} seed {r.seed}" + (f" (after {r.parent} seed {r.seed})" if r.parent else ""))
        return 0
    finished = run_pool(runs, jobs=args.jobs, threads=args.threads, params_path=args.params, rows_path=args.rows_file)
    print(f"{len(finished)} run(s) trained; next: `dvc repro` records them")
    return 0


def cmd_launch_scoremaps(args: argparse.Namespace) -> int:
    from tlvit.config import ConfigError, load_params
    from tlvit.launch.executor import load_launcher_config
    from tlvit.launch.launcher import launch_scoremaps

    try:
        params = load_params(args.params)
        launcher = load_launcher_config(params, kind=args.kind, folder=args.folder, slurm_overrides=dict(args.slurm),
                                        params_path=args.params)
        if args.dry_run:
            print(f"would submit {args.scoremaps} score-map shard job(s) with launcher.kind={launcher.kind}")
            return 0
        ids = launch_scoremaps(args.scoremaps, params_path=args.params, launcher=launcher)
    except (ConfigError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted {len(ids)} score-map shard job(s) with launcher.kind={launcher.kind}: {', '.join(ids)}")
    print("next: once they have finished (`squeue`, or their logs), `dvc repro` records the stores without recomputing")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tlvit.launch.status import collect, format_table

    logging.basicConfig(level=logging.ERROR)
    print(format_table(collect(args.params, args.rows_file, use_dvc=not args.no_dvc)))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from tlvit.config import load_params
    from tlvit.layout import Layout
    from tlvit.tracking import sync_run_dir

    logging.basicConfig(level=logging.WARNING)
    run_dirs = args.run_dirs
    if not run_dirs:
        layout = Layout(load_params(args.params)["preset"])
        run_dirs = sorted(p for p in (layout.root / "runs" / layout.preset).glob("*/seed*") if p.is_dir())
    errors, recorded = 0, set()
    for d in run_dirs:
        r = sync_run_dir(d)
        if r.error:
            errors += 1
            print(f"  {d}: not synced ({r.error})")
        elif r.created or r.metrics_sent or r.closed:
            print(f"  {d}: run {r.run_id}" + (" created," if r.created else "") + f" {r.metrics_sent} metric value(s) sent"
                  + (", closed" if r.closed else ""))
        if r.created:
            recorded |= record_run_id(Path(d), r.run_id)
    print(f"{len(run_dirs)} run folder(s) checked, {errors} not synced")
    if recorded:
        print(f"run ids recorded in {', '.join(sorted(recorded))}; `dvc commit` them so that DVC does not re-run their "
              "stages")
    return 1 if errors else 0


def record_run_id(run_dir: Path, run_id: str) -> set[str]:
    """A run created by `tlvit sync`: its id into the run's result.json and into its row's metrics file
    (`metrics/<preset>/rows/<row>.json`, from `runs/<preset>/<row>/seed<k>`), which the report reads."""
    from tlvit.io import write_json

    changed = set()
    result = run_dir / "result.json"
    if result.is_file():
        res = json.loads(result.read_text())
        if res.get("mlflow_run_id") != run_id:
            write_json(result, {**res, "mlflow_run_id": run_id})
            changed.add(str(result))
    seed, row, preset = run_dir.name.removeprefix("seed"), run_dir.parent.name, run_dir.parent.parent.name
    metrics = run_dir.resolve().parents[3] / "metrics" / preset / "rows" / f"{row}.json"
    if metrics.is_file() and seed.isdigit():
        m = json.loads(metrics.read_text())
        runs = [dict(r, mlflow_run_id=run_id) if r.get("seed") == int(seed) and r.get("mlflow_run_id") != run_id else r
                for r in m.get("runs", [])]
        if runs != m.get("runs"):
            write_json(metrics, {**m, "runs": runs})
            changed.add(str(metrics))
    return changed
