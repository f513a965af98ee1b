"""Item 2: images/s of the training loader with score maps vs without (target >= 0.95x).

Both loaders are the one `tlvit.train.train` builds: `DenseLabelDataset` with the preset's
TrainGeometry (crop, flip, RandAugment), random erasing, DistributedSampler and worker count; they
differ only in `score_maps` (reading each image's top-k maps from the memory-mapped store). Each
round runs both on the same epoch seed, so they see the same samples with the same augmentations.
Worker start-up and the first batch are left out; the loader runs without a model consuming it.
On a CPU the target is judged on images per CPU-second of the main process and its workers
(`tlvit.bench.common`); wall images/s are reported alongside.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tlvit.bench.common import (Bench, Target, column, interleave, markdown_table, median, paired_ratios,
                                quartiles, summary)
from tlvit.bench.fixture import BenchDataError, Fixture, ensure_fixture, workdir_or_temp

TARGET = 0.95
ROW = "lvvit_s_token_labeling"  # a row whose supervision reads score maps


def loader_config(preset: str, paths: tuple[Path, Path] | None = None) -> tuple[dict, dict]:
    """(preset sections, resolved train config of ROW)."""
    from tlvit.bench.step import Variant, default_paths, variant_config
    from tlvit.config import load_params, preset_section

    params_path, rows_path = paths or default_paths()
    sections = preset_section(load_params(params_path), preset, params_path)
    return sections, variant_config(Variant("data", "data", ROW), preset, params_path, rows_path)


def build_datasets(cfg: dict, fixture: Fixture):
    """(without score maps, with score maps): the train split exactly as `tlvit.train.train` builds it."""
    from tlvit.data.datasets import train_split

    return train_split(cfg, fixture.root, fixture.kind), train_split(cfg, fixture.root, fixture.kind, fixture.store)


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a running process, all its threads (Linux /proc).

    schedstat's run time is in nanoseconds; /proc/<pid>/stat's utime + stime (the fallback) counts
    10 ms clock ticks, which over a one-second window alone moved the ratio by several percent.
    """
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoaderRate:
    """Steady images/s of one dataset's training DataLoader; call k uses epoch k.

    The loader is given 1 + `batches` + its prefetch depth batches; the window runs from the first
    batch's arrival to the (1 + `batches`)-th, so worker start-up (a fork of the training process and
    its copy-on-write faults, measured to cost more CPU than the batches themselves on short runs) is
    left out, and the workers are still busy at both ends of it. wall: images/s over the window.
    cpu: images per CPU-second of the main process and its workers over the window (Linux /proc).
    """

    def __init__(self, ds, batch_size: int, workers: int, batches: int, pin_memory: bool = False):
        self.ds, self.batch_size, self.workers, self.batches, self.pin = ds, batch_size, workers, batches, pin_memory
        self.epoch = 0

    def needed(self) -> int:
        """Images the sampler must give (prefetch: 2 batches per worker, DataLoader's default)."""
        return (1 + self.batches + 2 * self.workers) * self.batch_size

    def _cpu(self, it) -> float:
        workers = getattr(it, "_workers", [])  # DataLoader's worker processes (none with num_workers=0)
        return time.process_time() + sum(process_cpu_seconds(w.pid) for w in workers)

    def __call__(self) -> dict[str, float]:
        from torch.utils.data import DataLoader, DistributedSampler

        from tlvit.data.datasets import hash_seed

        self.ds.set_epoch(0, self.epoch)
        sampler = DistributedSampler(self.ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(self.epoch)
        order = list(sampler)[: self.needed()]  # the sampler's order, cut to whole batches
        loader = DataLoader(self.ds, batch_size=self.batch_size, sampler=order, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(hash_seed(0, self.epoch)), drop_last=True,
                            pin_memory=self.pin)
        self.epoch += 1
        it = iter(loader)
        next(it)
        t0, c0 = time.perf_counter(), self._cpu(it)
        for _ in range(self.batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, self._cpu(it) - c0
        del it
        images = self.batches * self.batch_size
        return {"wall": images / wall, "cpu": images / cpu}


def run(out_dir: str | Path, *, quick: bool = False, preset: str = "embedded", workdir: str | Path | None = None,
        fixture: Fixture | None = None, data_root: str | Path | None = None, score_maps: str | Path | None = None,
        batch_size: int | None = None, batches: int | None = None,
        rounds: int | None = None, workers: int | None = None, paths: tuple[Path, Path] | None = None) -> dict:
    """Interleaved rounds of both loaders; the ratio (with / without) is the median over rounds.

    data_root + score_maps: an existing ImageFolder and its train split's store (e.g. ImageNet on a
    cluster) instead of the embedded canvases built in `workdir`.
    """
    sections, cfg = loader_config(preset, paths)
    if (data_root is None) != (score_maps is None):
        raise BenchDataError("pass both --data and --score-maps, or neither")
    if data_root is not None:
        fixture = Fixture(Path(data_root), Path(score_maps), sections["data"]["kind"])
    batch_size = batch_size or (16 if quick else cfg["batch_size"])
    batches = batches or (2 if quick else 11)  # 1 + 11 + prefetch 4 batches of 128 = the 2048-image fixture
    rounds = rounds or (1 if quick else 30)
    workers = cfg["workers"] if workers is None else workers
    bench = Bench("data", out_dir, quick=quick)
    with workdir_or_temp(workdir) as wd:
        if fixture is None:
            fixture = ensure_fixture(wd, sections, max(64 if quick else 2048, (1 + batches + 2 * workers) * batch_size))
        plain, maps = build_datasets(cfg, fixture)
        pin = torch.cuda.is_available()
        rates = {"without": LoaderRate(plain, batch_size, workers, batches, pin),
                 "with": LoaderRate(maps, batch_size, workers, batches, pin)}
        if len(plain) < rates["with"].needed():
            raise BenchDataError(f"{fixture.root}/train has {len(plain)} images; the benchmark needs {rates['with'].needed()} "
                                 "(lower --batch-size)")
        if workers > 0:  # the same work in the main process: no IPC, no worker start-up, a tighter ratio
            rates["without, in process"] = LoaderRate(plain, batch_size, 0, batches)
            rates["with, in process"] = LoaderRate(maps, batch_size, 0, batches)
        samples = interleave(rates, rounds, warmup=0 if quick else 1)
        store_info = {"grid": list(maps.store.grid), "k": int(maps.store.index["k"]),
                      "bytes_per_image": maps.store.bytes_per_image()}
    bench.sample_load()
    results, rows = {"score_maps": store_info}, []
    for clock in ("wall", "cpu"):
        without, with_maps = column(samples["without"], clock), column(samples["with"], clock)
        ratio = summary(paired_ratios(with_maps, without))
        results[clock] = {"without_score_maps_img_s": summary(without, 1), "with_score_maps_img_s": summary(with_maps, 1),
                          "ratio": ratio}
        what = "images/s" if clock == "wall" else "images per CPU-second"
        rows += [(f"without score maps ({what})", f"{median(without):.0f}", "{:.0f}–{:.0f}".format(*quartiles(without))),
                 (f"with score maps ({what})", f"{median(with_maps):.0f}", "{:.0f}–{:.0f}".format(*quartiles(with_maps))),
                 (f"ratio with / without ({clock})", f"{ratio['median']:.3f}", f"{ratio['q25']:.3f}–{ratio['q75']:.3f}")]
    if "with, in process" in samples:
        without, with_maps = column(samples["without, in process"], "cpu"), column(samples["with, in process"], "cpu")
        ratio = summary(paired_ratios(with_maps, without))
        results["in_process_cpu"] = {"without_score_maps_img_s": summary(without, 1),
                                     "with_score_maps_img_s": summary(with_maps, 1), "ratio": ratio}
        rows.append(("ratio with / without (cpu, workers=0: the per-image work alone)", f"{ratio['median']:.3f}",
                     f"{ratio['q25']:.3f}–{ratio['q75']:.3f}"))
    table = markdown_table(("loader", "median", "q25–q75"), rows)
    settings = {"preset": preset, "row": ROW, "batch_size": batch_size, "batches_per_round": batches, "rounds": rounds,
                "workers": workers, "images": len(plain), "img_size": cfg["img_size"], "rand_augment": cfg.get("rand_augment"),
                "reprob": cfg.get("reprob"), "data_root": str(fixture.root), "store": str(fixture.store)}
    clock = "wall" if pin else "cpu"  # see tlvit.bench.common: CPU time on a CPU-only machine
    settings["clock_for_targets"] = clock
    targets = [Target(f"data: loader images/s with / without score maps ({clock})", results[clock]["ratio"]["median"],
                      ">=", TARGET)]
    return bench.finish(settings=settings, results=results, targets=targets, tables=[table],
                        notes=[f"target judged on {clock} time (main process + {workers} loader workers)"])
