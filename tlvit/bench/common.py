"""What every benchmark shares: interleaved rounds, medians, targets (✓/✗), tables and the JSON record.

Ratios are measured the way a shared machine allows: the variants run one after another within a
round (the order rotated every round, so none always runs first or right after a particular other),
each round gives one ratio per pair, and the reported ratio is the median over rounds. Load from
other jobs then slows both sides of a pair alike, and the median drops the rounds it hit unevenly.

Every timing records wall seconds and the CPU seconds of this process (and of its finished child
processes, e.g. DataLoader workers). On a CPU the targets are judged on CPU time: on a machine
shared with other jobs, wall time mostly measures how long the job waited for a core (measured
here: an A/A pair of identical steps at load 7 on 2 cores spread 0.87-1.20 in wall time at 2
threads, 0.97-1.02 in CPU time at 1 thread), while on an idle machine the two agree. On a GPU
the targets use wall time (synchronised), the only meaningful clock there.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout whose code is being timed
OPS = ("<=", ">=")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- timing
def interleave(fns: Mapping[str, Callable[[], T]], rounds: int, warmup: int = 1) -> dict[str, list[T]]:
    """Call every fn once per round, the order rotated by one each round; {name: [sample per round]}.

    Each fn measures itself and returns its sample (seconds, images/s, a dict of both clocks, ...),
    so it can leave set-up out. `warmup` untimed rounds come first (allocator, thread pools, lazy initialisation).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(fns[name]())
    return samples


def column(samples: Sequence[Mapping[str, float]], key: str) -> list[float]:
    """One clock's values out of a list of {"wall": ..., "cpu": ...} samples."""
    return [s[key] for s in samples]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] per round (both measured in the same round)."""
    if len(num) != len(den):
        raise ValueError(f"paired samples differ in length: {len(num)} vs {len(den)}")
    return [a / b for a, b in zip(num, den)]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; both the value itself for a single sample."""
    if len(xs) < 2:
        return float(xs[0]), float(xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def summary(xs: Sequence[float], digits: int = 4) -> dict:
    """Median, quartiles and count of a list of samples (as stored in the JSON)."""
    lo, hi = quartiles(xs)
    return {"median": round(median(xs), digits), "q25": round(lo, digits), "q75": round(hi, digits), "n": len(xs),
            "samples": [round(x, digits) for x in xs]}


def _cpu_now(children: bool) -> float:
    """CPU seconds (user + system) of this process, plus its waited-for children if asked."""
    t = time.process_time()
    if children:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += ru.ru_utime + ru.ru_stime
    return t


class Stopwatch:
    """Wall (`seconds`) and CPU (`cpu_seconds`) time of a block.

    sync: e.g. torch.cuda.synchronize, called before each clock reading.
    children: add the CPU time of child processes that ended (and were waited for) inside the block.
    """

    def __init__(self, sync: Callable[[], None] | None = None, children: bool = False):
        self.sync = sync or (lambda: None)
        self.children = children

    def __enter__(self) -> "Stopwatch":
        self.sync()
        self.t0, self.c0 = time.perf_counter(), _cpu_now(self.children)
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = _cpu_now(self.children) - self.c0


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A goal of the spec (docs/benchmarks.md): `value op threshold`; value None = not measured."""

    name: str
    value: float | None
    op: str  # "<=" or ">="
    threshold: float
    unit: str = "×"
    note: str = ""

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"target op must be one of {OPS}, not {self.op!r}")

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "–"}[self.met]

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


def all_met(targets: Sequence[Target]) -> bool | None:
    """True if every measured target is met, False if any is missed, None if none was measured."""
    measured = [t.met for t in targets if t.met is not None]
    return all(measured) if measured else None


# ---------------------------------------------------------------------------------------------- tables
def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table (the same text goes to the terminal and into docs/benchmarks.md)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def targets_table(targets: Sequence[Target]) -> str:
    rows = [(t.name, f"{fmt(t.value, 4)}{t.unit if t.value is not None else ''}", f"{t.op} {t.threshold}{t.unit}", t.mark)
            for t in targets]
    return markdown_table(("target", "measured", "goal", "met"), rows)


# ---------------------------------------------------------------------------------------------- provenance
def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(loads: Sequence[float | None]) -> dict:
    """Host, CPU, cores and the 1-min load average seen during the run; shared = load above the core count."""
    seen = [x for x in loads if x is not None]
    cores = cpu_cores()
    peak = max(seen) if seen else None
    return {"hostname": platform.node(), "cpu": cpu_model(), "cores": cores, "platform": platform.platform(),
            "load_1m_max": round(peak, 2) if peak is not None else None, "shared": bool(peak is not None and peak > cores)}


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


class Bench:
    """One benchmark's run: samples the load while it runs, then prints its tables and writes its JSON."""

    def __init__(self, name: str, out_dir: str | Path, *, quick: bool, device: str = "cpu"):
        self.name, self.out_dir, self.quick, self.device = name, Path(out_dir), quick, device
        self.loads = [load_1m()]
        self.started = _dt.datetime.now(_dt.timezone.utc)

    def sample_load(self) -> None:
        self.loads.append(load_1m())

    def finish(self, *, settings: dict, results: dict, targets: Sequence[Target] = (), tables: Sequence[str] = (),
               notes: Sequence[str] = (), status: str = "ok") -> dict:
        """Print the tables, the ✓/✗ targets and the notes; write `<out>/<name>.json`; return the record."""
        import timm
        import torch

        from tlvit.io import write_json
        from tlvit.provenance import git_commit

        self.sample_load()
        machine = machine_info(self.loads)
        notes = list(notes)
        if machine["shared"]:
            notes.append(f"machine shared: the 1-min load average reached {machine['load_1m_max']} on {machine['cores']} "
                         "cores while this ran (other jobs): absolute times are inflated, ratios are medians of interleaved rounds")
        record = {
            "benchmark": self.name, "status": status, "quick": self.quick,
            "date": self.started.isoformat(timespec="seconds"),
            "duration_s": round((_dt.datetime.now(_dt.timezone.utc) - self.started).total_seconds(), 1),
            "commit": git_commit(SOURCE_ROOT), "machine": machine, "device": device_name(self.device),
            "torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
            "torch_threads": torch.get_num_threads(),
            "settings": settings, "results": results, "targets": [t.as_dict() for t in targets],
            "all_targets_met": all_met(targets), "notes": notes,
        }
        path = self.out_dir / f"{self.name}.json"
        write_json(path, record)
        mode = " (quick: not representative)" if self.quick else ""
        print(f"\n## {self.name}{mode} — {record['device']}, torch {record['torch']}, commit {record['commit'][:12]}, "
              f"{record['date']}")
        for table in tables:
            print(f"\n{table}")
        if targets:
            print(f"\n{targets_table(targets)}")
        for note in notes:
            print(f"note: {note}")
        print(f"-> {path}")
        return record
