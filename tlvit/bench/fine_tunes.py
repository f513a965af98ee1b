"""Wall time of a preset's downstream stages (`transfer`, `segmentation`, `detection`), fine-tune by fine-tune.

`tlvit bench repro` times a whole `dvc repro`. For embedded-downstream that is ~15 h on 2 CPU cores: longer than a
working session, and the parents' checkpoints those three stages start from live only as long as the workspace. This
benchmark times the three stages without them. Each parent (row, seed) is a stand-in checkpoint: the row's resolved
config and finished epoch count with random weights (seeded). A fine-tune's work does not depend on its parent's
weights (a fixed number of iterations or epochs, fixed val sets), except detection's inference, which keeps at most
`proposals` boxes per image: an untrained backbone can only make that slower.

One unit is one (stage, row, seed): the stage's own `fine_tune_rows`, called for that row and seed alone (every head
or task the stage plans for it), MLflow tracking into the workdir as in `dvc repro`; its run folders are removed
first, so nothing finished is read back. Each unit's wall time goes to a ledger (TSV) as it ends, and units already in
the ledger are skipped: the measurement resumes in a later session, on a fresh workspace, from the ledger alone.
`budget_min` stops starting units after that many minutes. A stage's time is the sum of its units'; each unit reads
the stage's data sets again (the stage reads them once per run), a few seconds per unit more than the stage spends.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from tlvit.bench.common import Bench, load_1m, markdown_table

STAGES = ("transfer", "segmentation", "detection")
LEDGER_HEADER = "stage\trow\tseed\tfine_tunes\twall_s\tended_utc\tcommit\tload_1m"


def read_ledger(path: Path) -> dict[tuple[str, str, int], dict]:
    """{(stage, row, seed): its line's fields} of a ledger (empty when there is none)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or lines[0] != LEDGER_HEADER:
        raise ValueError(f"{path}: not a fine-tune ledger (its first line must be the header {LEDGER_HEADER!r}); "
                         "pass another --ledger, or move this file away")
    out = {}
    for line in lines[1:]:
        f = dict(zip(LEDGER_HEADER.split("\t"), line.split("\t")))
        out[(f["stage"], f["row"], int(f["seed"]))] = {**f, "wall_s": float(f["wall_s"]),
                                                       "fine_tunes": int(f["fine_tunes"])}
    return out


def append_ledger(path: Path, fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a") as f:  # one line per finished unit: a kill loses at most the unit running
        if new:
            f.write(LEDGER_HEADER + "\n")
        f.write("\t".join(str(fields[k]) for k in LEDGER_HEADER.split("\t")) + "\n")
        f.flush()
        os.fsync(f.fileno())


MARKER = ".tlvit-bench-fine-tunes"  # a workdir holding it is this benchmark's own: its runs may be deleted


def claim_workdir(path: Path) -> None:
    """The workdir is a new or empty folder, or one this benchmark made: its units delete their stage's runs and
    write stand-in checkpoints, which must never land in a repository's real runs/."""
    from tlvit.bench.fixture import BenchDataError

    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise BenchDataError(f"{path}: not empty and not made by `tlvit bench fine-tunes` (its stand-in parents and "
                             "deleted runs would mix with what is there); pass a new folder as --workdir")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()


def planned_units(trained: list[str], sections: dict, tables: dict, seeds: list[int],
                  params_path: str) -> list[tuple[str, str, int, int]]:
    """(stage, row, seed, fine-tunes in the unit) in the order the stages run them, from each stage's own plan."""
    from tlvit import detection, segmentation, transfer

    units = []
    for stage in STAGES:
        if stage == "transfer":
            per_row = {r: len(sections["transfer"].get("tasks") or [])
                       for r in transfer.planned_rows(trained, tables["transfer"], sections["transfer"], params_path)}
        elif stage == "segmentation":
            per_row = collections.Counter(row for row, _ in segmentation.planned_runs(
                trained, tables["segmentation"], sections["segmentation"], params_path))
        else:
            per_row = {r: 1 for r in detection.planned_rows(trained, tables["detection"], sections["detection"],
                                                            params_path)}
        units += [(stage, row, seed, n) for row, n in per_row.items() if n for seed in seeds]
    return units


def write_stand_in(layout, row: str, seed: int, cfg: dict, num_classes: int) -> None:
    """A finished-looking checkpoint of (row, seed): its config, random weights seeded by `seed`, no EMA."""
    from tlvit.config import config_hash
    from tlvit.models.build import build_model
    from tlvit.train import scheduled_epochs

    path = layout.run_dir(row, seed) / "checkpoint.pt"
    if path.is_file():
        return
    torch.manual_seed(seed)
    ckpt = {"config": cfg, "config_hash": config_hash(cfg), "model": build_model(cfg, num_classes).state_dict(),
            "ema": None, "epoch": scheduled_epochs(cfg)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def ensure_data(layout, data_section: dict) -> int:
    """The data stage's canvases and dataset.json under the layout (built once); returns the number of classes."""
    from tlvit.bench.fixture import quiet_progress
    from tlvit.data.canvases import CanvasSpec, write_canvases
    from tlvit.io import write_json

    if data_section["kind"] != "canvases":
        from tlvit.bench.fixture import BenchDataError

        raise BenchDataError(f"preset data kind {data_section['kind']!r}: the stand-in fine-tunes are timed on the "
                             "embedded canvases only; use an embedded preset")
    canvases = layout.data_dir / "canvases"
    if not layout.dataset_file.is_file():
        shutil.rmtree(canvases, ignore_errors=True)  # a half-written folder from a killed call
        with quiet_progress():
            stats = write_canvases(canvases, CanvasSpec.from_params(data_section))
        write_json(layout.dataset_file, {"kind": "canvases", "root": str(canvases.resolve()), "splits": stats})
    return sum(1 for d in (canvases / "train").iterdir() if d.is_dir())


def run_unit(layout, stage: str, row: str, seed: int, sections: dict, tables: dict, params_path: str) -> None:
    """The stage's fine-tunes of (row, seed), as the stage runs them."""
    from tlvit import detection, segmentation, transfer

    shutil.rmtree(layout.root / "runs" / layout.preset / stage, ignore_errors=True)  # nothing read back
    seeds_of = lambda r: [seed]  # noqa: E731
    if stage == "transfer":
        transfer.fine_tune_rows(layout, [row], tables["transfer"], sections["transfer"], seeds_of,
                                params_path=params_path)
    elif stage == "segmentation":
        segmentation.fine_tune_rows(layout, [row], tables["segmentation"], sections["segmentation"], seeds_of,
                                    params_path=params_path)
    else:
        detection.fine_tune_rows(layout, [row], tables["detection"], sections["detection"], seeds_of,
                                 sections["data"], params_path=params_path)


def run(out_dir: str | Path, *, preset: str = "embedded-downstream", workdir: str | Path | None = None,
        ledger: str | Path | None = None, stages=STAGES, budget_min: float | None = None,
        rows: list[str] | None = None, paths: tuple[Path, Path] | None = None) -> dict:
    """Time the units of `stages` not yet in the ledger (default `<out>/fine-tunes-<preset>.tsv`); `rows`: only these
    of the preset's rows (default: every row it trains, as `tlvit rows` lists them)."""
    from tlvit.bench.fixture import workdir_or_temp
    from tlvit.bench.step import default_paths
    from tlvit.config import load_params, preset_section, resolve_run_config
    from tlvit.layout import Layout
    from tlvit.provenance import git_commit
    from tlvit.tables import (DETECTION_TABLE, SEGMENTATION_TABLES, TRANSFER_TABLE, load_column_table,
                              preset_rows)

    params_path, rows_path = paths or default_paths()
    root = Path(params_path).parent
    params = load_params(params_path)
    sections = preset_section(params, preset, params_path)
    trained = preset_rows(params, preset, root / "experiments" / "tables", rows_path, params_path, root=root)
    if rows is not None:
        trained = [r for r in trained if r in rows]
    tables = {"transfer": load_column_table(root / TRANSFER_TABLE),
              "segmentation": {k: load_column_table(root / p) for k, p in SEGMENTATION_TABLES.items()},
              "detection": load_column_table(root / DETECTION_TABLE)}
    seeds = [int(s) for s in sections["seeds"]]
    every = planned_units(trained, sections, tables, seeds, str(params_path))
    units = [u for u in every if u[0] in stages]
    ledger = Path(ledger or Path(out_dir) / f"fine-tunes-{preset}.tsv")
    done = read_ledger(ledger)
    bench = Bench(f"fine-tunes-{preset}", out_dir, quick=False)
    commit, started = git_commit(), time.monotonic()
    timed = 0
    if workdir is not None:
        claim_workdir(Path(workdir))
    with workdir_or_temp(workdir) as wd, _tracking_into(wd / "mlflow.db"):
        layout = Layout(preset, wd)
        todo = [u for u in units if u[:3] not in done]
        if todo:
            num_classes = ensure_data(layout, sections["data"])
            configs = {r: resolve_run_config(params, r, preset=preset, rows_path=rows_path, params_path=params_path)
                       for r in trained}
        for stage, row, seed, n in todo:
            if budget_min is not None and time.monotonic() - started > 60 * budget_min:
                break
            for r in trained:  # every row of the seed (once): a fine-tune row's transfer reads its pre-training run too
                write_stand_in(layout, r, seed, configs[r], num_classes)
            t0 = time.perf_counter()
            run_unit(layout, stage, row, seed, sections, tables, str(params_path))
            wall = time.perf_counter() - t0
            append_ledger(ledger, {"stage": stage, "row": row, "seed": seed, "fine_tunes": n, "wall_s": round(wall, 1),
                                   "ended_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                   "commit": commit[:12], "load_1m": _round(load_1m())})
            bench.sample_load()
            timed += 1
            print(f"fine-tunes: {stage} {row} seed {seed}: {wall:.0f} s", flush=True)
    return _finish(bench, read_ledger(ledger), every, ledger, preset, timed)


@contextlib.contextmanager
def _tracking_into(db: Path) -> Iterator[None]:
    """MLflow runs go to the workdir's store while the units run (the caller's setting is restored afterwards)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db.resolve()}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _finish(bench: Bench, ledger: dict, units: list, path: Path, preset: str, timed: int) -> dict:
    results, lines = {}, []
    for stage in dict.fromkeys(u[0] for u in units):
        planned = [u for u in units if u[0] == stage]
        measured = [ledger[u[:3]] for u in planned if u[:3] in ledger]
        wall = round(sum(m["wall_s"] for m in measured), 1)
        results[stage] = {"units": len(planned), "units_measured": len(measured),
                          "fine_tunes": sum(u[3] for u in planned),
                          "fine_tunes_measured": sum(m["fine_tunes"] for m in measured), "wall_s": wall,
                          "complete": len(measured) == len(planned)}
        lines.append((stage, f"{len(measured)} / {len(planned)}", f"{results[stage]['fine_tunes_measured']} / "
                      f"{results[stage]['fine_tunes']}", f"{wall:.0f}", "yes" if results[stage]["complete"] else "no"))
    table = markdown_table(("stage", "units (row, seed) measured", "fine-tunes measured", "wall s (sum)", "complete"),
                           lines)
    settings = {"preset": preset, "ledger": str(path), "timed_this_call": timed,
                "parents": "stand-ins: each row's config, random weights (time does not depend on them)",
                "torch_threads": torch.get_num_threads()}
    return bench.finish(settings=settings, results=results, tables=[table])
