"""Item 4: wall time of `dvc repro` from a clean state, and of a no-op `dvc repro` (target <= 3 s).

Each preset runs in a fresh clone of this checkout (`tlvit.bench.repo_copy.source_clone`: its HEAD with the
uncommitted changes, no outputs, no DVC cache, MLflow in the clone; its runs record `<HEAD>-dirty`, the
params.yaml edit being the preset), so "clean" means every stage runs.
The no-op is `dvc repro` again right after, repeated; the median counts. `--quick` reproduces only
the smoke preset's `data` stage (seconds), which checks the code path, not the pipeline's time.
The embedded preset takes ~30 min on 2 cores: ask for it with `--repro-presets smoke embedded`.

Each stage's wall time is taken from the moment DVC announces it ("Running stage ...") to the next
announcement (or the end), and appended to `<out>/repro-<preset>.stages.tsv` as it finishes, so a run
of hours shows its progress and keeps what it measured if it is killed. `all_rows` fills `rows` and
`finetunes` with the rows the preset is for first (`tlvit rows --write`: every table's, or with
`rows_from: downstream` the downstream tables'): with `embedded-full` that is issue #8's whole run, judged
against its targets (<= 8 h on the CPU, <= 1 h on one GPU).

A run longer than a working session can be done in parts: with `workdir` the copy is made there once and
kept, and a later call with the same folder resumes it. DVC skips the stages that finished (dvc.lock), the
interrupted stage starts again and its runs resume from their last checkpoint; the stage log keeps every
attempt (`outcome`: done | interrupted, an interrupted one timed to its last heartbeat, at most
HEARTBEAT_S early), and the clean time is the sum of all attempts' stage times: the time the run would take
in one piece, plus the work redone since each interruption's last checkpoint.
"""
from __future__ import annotations

import collections
import datetime as _dt
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tlvit.bench.common import SOURCE_ROOT, Bench, Target, cpu_cores, markdown_table, summary
from tlvit.bench.repo_copy import set_preset, source_clone, tool_env

NOOP_TARGET_S = 3.0
# Clean-run targets per preset and device kind (issue #8: the embedded default <= 30 min on 2 CPU cores;
# embedded-full, every row of every table with 3 seeds, <= 8 h on 2 CPU cores and <= 1 h on one GPU).
CLEAN_TARGETS_MIN = {("embedded", "cpu"): 30.0, ("embedded-full", "cpu"): 480.0, ("embedded-full", "gpu"): 60.0}
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
STAGE_LOG_HEADER = "stage\tended_utc\twall_s\toutcome"
HEARTBEAT_S = 30.0  # how often the running stage's elapsed time is saved (what an interrupted attempt is timed to)


def _utc(epoch: float | None = None) -> str:
    when = _dt.datetime.now(_dt.timezone.utc) if epoch is None else _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)
    return when.isoformat(timespec="seconds")


def running_file(stage_log: Path) -> Path:
    """Where timed_repro keeps the running stage: `name<TAB>started (epoch s)<TAB>alive (epoch s)`."""
    return stage_log.with_name(stage_log.name + ".running")


def close_interrupted(stage_log: Path) -> str | None:
    """A stage left running by a killed attempt goes to the log as `interrupted`, timed from its start to its last
    heartbeat; returns its name (None when the last attempt ended cleanly)."""
    running = running_file(stage_log)
    if not running.exists():
        return None
    name, started, alive = running.read_text().strip().split("\t")
    with open(stage_log, "a") as f:
        f.write(f"{name}\t{_utc(float(alive))}\t{round(float(alive) - float(started), 1)}\tinterrupted\n")
    running.unlink()
    return name


def read_stage_log(stage_log: Path) -> tuple[dict[str, float], int]:
    """({stage: its wall seconds summed over attempts}, interrupted attempts) from a stage log."""
    walls: dict[str, float] = {}
    interrupted = 0
    for line in stage_log.read_text().splitlines()[1:]:
        name, _, wall, outcome = line.split("\t")
        walls[name] = round(walls.get(name, 0.0) + float(wall), 1)
        interrupted += outcome == "interrupted"
    return walls, interrupted


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def timed_repro(repo: Path, env: dict, targets: list[str], timeout: float | None,
                stage_log: Path | None = None) -> tuple[float, dict[str, float]]:
    """(wall seconds, {stage that ran: its wall seconds} in the order they ran) of `dvc repro [targets]`.

    The output is read as it comes (unbuffered, stderr merged so neither pipe fills): a stage's time runs
    from DVC's "Running stage" line to the next one or the end. Only the output's tail is kept, for the
    error a failed run raises; `stage_log` gets one tab-separated line per finished stage, and its `.running`
    file the stage in progress (rewritten every HEARTBEAT_S), so that a killed run's last stage is timed too."""
    env = {**env, "PYTHONUNBUFFERED": "1"}  # DVC and the stages' prints arrive when written, not when a buffer fills
    tail: collections.deque[str] = collections.deque(maxlen=200)
    walls: dict[str, float] = {}
    current: tuple[str, float] | None = None

    epoch_offset = time.time() - time.perf_counter()  # perf_counter times, as epoch seconds in the .running file

    def close(now: float) -> None:
        if current is None:
            return
        name, start = current
        walls[name] = round(now - start, 1)
        if stage_log is not None:
            with open(stage_log, "a") as f:
                f.write(f"{name}\t{_utc()}\t{walls[name]}\tdone\n")
            running_file(stage_log).unlink(missing_ok=True)

    def save_running(now: float) -> None:
        if stage_log is not None and current is not None:
            tmp = running_file(stage_log).with_suffix(".tmp")
            tmp.write_text(f"{current[0]}\t{current[1] + epoch_offset}\t{now + epoch_offset}\n")
            tmp.replace(running_file(stage_log))  # atomic: a kill never leaves half a line

    stop_beating, switching = threading.Event(), threading.Lock()  # the heartbeat never saves a stage that ended

    def heartbeat() -> None:
        while not stop_beating.wait(HEARTBEAT_S):
            with switching:
                save_running(time.perf_counter())

    t0 = time.perf_counter()
    # its own process group, so that a timeout or Ctrl-C stops the stage DVC runs too (it holds the pipe open)
    with subprocess.Popen(["dvc", "repro", *targets], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", start_new_session=True) as p:
        def kill() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        # a timer, not a check per line: a stage may print nothing for a long time
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), kill())) if timeout is not None else None
        if timer is not None:
            timer.start()
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        # `kill <pid>` of this process must stop the stage too (in its own group it would run on, orphaned)
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if on_main else None
        try:
            for line in p.stdout:
                tail.append(line)
                for name in STAGE_LINE.findall(line):
                    now = time.perf_counter()
                    with switching:
                        close(now)
                        current = (name, now)
                        save_running(now)
            rc = p.wait()
        except BaseException:
            kill()
            raise
        finally:
            stop_beating.set()
            beat.join()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if timer is not None:
                timer.cancel()
    seconds = time.perf_counter() - t0
    if timed_out.is_set():
        raise TimeoutError(f"dvc repro in {repo} ran past {timeout:.0f} s (killed); stages done: {list(walls)}")
    if rc != 0:
        raise RuntimeError(f"dvc repro {' '.join(targets)} failed ({rc}) in {repo}:\n{''.join(tail)[-6000:]}")
    close(t0 + seconds)
    return seconds, walls


def clean_target_min(preset: str, kind: str, *, quick: bool, all_rows: bool) -> float | None:
    """The clean-run target in minutes, where one was set for this run: every stage (not --quick); `embedded`
    with its own rows, `embedded-full` with every table's rows (its default two rows are not the run #8 means)."""
    if quick or all_rows != (preset == "embedded-full"):
        return None
    return CLEAN_TARGETS_MIN.get((preset, kind))


def every_table_row(preset: str) -> tuple[list[str], dict[str, str]]:
    """(rows, finetunes) that fill the tables `preset` is for, from the source checkout (`tlvit rows`: every table,
    or the downstream tables for a preset with `rows_from: downstream`)."""
    from tlvit.config import load_params
    from tlvit.tables import preset_rows, split_finetunes

    params_path, rows_path = SOURCE_ROOT / "params.yaml", SOURCE_ROOT / "experiments" / "rows.yaml"
    order = preset_rows(load_params(params_path), preset, SOURCE_ROOT / "experiments" / "tables", rows_path, params_path,
                        root=SOURCE_ROOT)
    return split_finetunes(order, rows_path)


def dvc_version(env: dict) -> str:
    p = subprocess.run(["dvc", "--version"], env=env, capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def run(out_dir: str | Path, *, quick: bool = False, presets: tuple[str, ...] = ("smoke",), noop_repeats: int | None = None,
        timeout_s: float | None = None, keep: bool = False, all_rows: bool = False,
        workdir: str | Path | None = None) -> dict:
    """Clean `dvc repro` then `noop_repeats` no-op ones, per preset. `workdir`: the copies live in
    `<workdir>/<preset>` and are kept; a copy already there is resumed (module docstring)."""
    import torch

    from tlvit.provenance import git_commit
    from tlvit.tables import set_rows_in_params

    noop_repeats = noop_repeats or (1 if quick else 5)
    targets = ["data"] if quick else []
    kind = "gpu" if torch.cuda.is_available() else "cpu"  # the stages train on the GPU when there is one
    bench = Bench("repro", out_dir, quick=quick, device="cuda" if kind == "gpu" else "cpu")
    results, rows, checks, stage_tables = {}, [], [], []
    for preset in presets:
        if all_rows:
            scratch, finetunes = every_table_row(preset)
            edit = lambda text, p=preset, r=scratch, f=finetunes: set_rows_in_params(set_preset(text, p), r, f)  # noqa: E731
        else:
            edit = lambda text, p=preset: set_preset(text, p)  # noqa: E731
        stage_log = Path(out_dir) / f"repro-{preset}.stages.tsv"
        stage_log.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(workdir) / preset if workdir else Path(tempfile.mkdtemp(prefix=f"tlvit-bench-repro-{preset}-"))
        resumed = workdir is not None and (tmp / ".git").is_dir()
        if resumed:  # the copy of an earlier call: its params, rows and commit stay those it started with
            if not stage_log.exists():
                raise RuntimeError(f"{stage_log}: missing; the run in {tmp} was timed into another --out folder "
                                   f"(use that one, or a new --repro-workdir to start again)")
            repo, env = tmp, tool_env()
            close_interrupted(stage_log)
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            if any(tmp.iterdir()):
                raise RuntimeError(f"{tmp}: not empty and no git checkout; choose an empty or new --repro-workdir")
            repo, env = source_clone(tmp, edit)
            stage_log.write_text(STAGE_LOG_HEADER + "\n")
        seconds, _ = timed_repro(repo, env, targets, timeout_s, stage_log)
        walls, interrupted = read_stage_log(stage_log)  # every attempt's stages (one attempt: this call's)
        clean_s = sum(walls.values()) if resumed else seconds
        bench.sample_load()
        noops = []
        for _ in range(noop_repeats):
            seconds, again = timed_repro(repo, env, targets, timeout_s)
            if again:
                raise RuntimeError(f"a second `dvc repro` in {repo} ran stages {list(again)}: the pipeline is not idempotent")
            noops.append(seconds)
        noop = summary(noops, 2)
        results[preset] = {"clean_s": round(clean_s, 1), "stages": list(walls), "stage_wall_s": walls, "noop_s": noop,
                           "targets": targets or "all", "all_rows": all_rows, "stage_log": str(stage_log),
                           "resumed": resumed, "interrupted_attempts": interrupted, "copy_commit": git_commit(repo),
                           "copy": str(repo) if keep or workdir else None}
        rows.append((preset + (" (data stage only)" if targets else "") + (", every table's rows" if all_rows else ""),
                     f"{clean_s:.1f}", len(walls), f"{noop['median']:.2f}", f"{noop['q25']:.2f}–{noop['q75']:.2f}"))
        stage_tables.append(markdown_table((f"stage ({preset})", "wall (s)"), [(k, f"{v:.1f}") for k, v in walls.items()]))
        checks.append(Target(f"repro: no-op `dvc repro` ({preset})", noop["median"], "<=", NOOP_TARGET_S, unit=" s"))
        goal = clean_target_min(preset, kind, quick=quick, all_rows=all_rows)
        if goal is not None:
            where = f"{cpu_cores()} CPU cores" if kind == "cpu" else "1 GPU"
            checks.append(Target(f"repro: clean `dvc repro` ({preset}, {where})",
                                 round(clean_s / 60, 1), "<=", goal, unit=" min"))
        if not keep and not workdir:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    table = markdown_table(("preset", "clean `dvc repro` (s)", "stages run", "no-op (s, median)", "no-op q25–q75"), rows)
    settings = {"presets": list(presets), "dvc_targets": targets or "all stages", "noop_repeats": noop_repeats,
                "all_rows": all_rows, "dvc": dvc_version(env),
                "clean": "fresh clone of the checkout (HEAD + uncommitted changes): no outputs, no DVC cache"}
    return bench.finish(settings=settings, results=results, targets=checks, tables=[table, *stage_tables])
