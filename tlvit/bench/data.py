"""Item 2: images/s of the training loader with score maps vs without (target >= 0.95x).

Both loaders are the one `tlvit.train.train` builds: `DenseLabelDataset` with the preset's
TrainGeometry (crop, flip, RandAugment), random erasing, DistributedSampler and worker count; they
differ only in `score_maps` (reading each image's top-k maps from the memory-mapped store). Each
round runs both on the same epoch seed, so they see the same samples with the same augmentations.
Worker start-up and the first batch are left out; the loader runs without a model consuming it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tlvit.bench.common import Bench, Stopwatch, Target, interleave, markdown_table, paired_ratios, summary
from tlvit.bench.fixture import Fixture, ensure_fixture, workdir_or_temp

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
    """(without score maps, with score maps): the train split as `tlvit.train.train` builds it."""
    from timm.data.random_erasing import RandomErasing

    from tlvit.data.datasets import DenseLabelDataset, TrainGeometry
    from tlvit.data.rand_augment import build_rand_augment
    from tlvit.train import DATA_STATS

    mean, std = DATA_STATS[fixture.kind]
    rand_augment = build_rand_augment(cfg["rand_augment"], cfg["img_size"], mean) if cfg.get("rand_augment") else None
    geometry = TrainGeometry(cfg["img_size"], tuple(cfg["crop_scale"]), tuple(cfg["crop_ratio"]), cfg["hflip"],
                             rand_augment=rand_augment)
    erasing = RandomErasing(cfg["reprob"], mode="pixel", device="cpu") if cfg.get("reprob") else None
    plain = DenseLabelDataset(fixture.root, "train", geometry, mean, std, erasing=erasing)
    maps = DenseLabelDataset(fixture.root, "train", geometry, mean, std, score_maps=fixture.store, erasing=erasing)
    return plain, maps


class LoaderRate:
    """images/s of one dataset's training DataLoader over `batches` batches; call k uses epoch k."""

    def __init__(self, ds, batch_size: int, workers: int, batches: int, pin_memory: bool = False):
        self.ds, self.batch_size, self.workers, self.batches, self.pin = ds, batch_size, workers, batches, pin_memory
        self.epoch = 0

    def __call__(self) -> float:
        from torch.utils.data import DataLoader, DistributedSampler

        from tlvit.data.datasets import hash_seed

        self.ds.set_epoch(0, self.epoch)
        sampler = DistributedSampler(self.ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(self.epoch)
        loader = DataLoader(self.ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(hash_seed(0, self.epoch)), drop_last=True,
                            pin_memory=self.pin)
        self.epoch += 1
        it = iter(loader)
        next(it)  # worker start-up and the first batch: not part of the steady rate
        with Stopwatch() as sw:
            for _ in range(self.batches):
                next(it)
        del it
        return self.batches * self.batch_size / sw.seconds


def run(out_dir: str | Path, *, quick: bool = False, preset: str = "embedded", workdir: str | Path | None = None,
        fixture: Fixture | None = None, batch_size: int | None = None, batches: int | None = None,
        rounds: int | None = None, workers: int | None = None, paths: tuple[Path, Path] | None = None) -> dict:
    """Interleaved rounds of both loaders; the ratio (with / without) is the median over rounds."""
    sections, cfg = loader_config(preset, paths)
    batch_size = batch_size or (16 if quick else cfg["batch_size"])
    batches = batches or (2 if quick else 8)
    rounds = rounds or (1 if quick else 10)
    workers = cfg["workers"] if workers is None else workers
    bench = Bench("data", out_dir, quick=quick)
    with workdir_or_temp(workdir) as wd:
        if fixture is None:
            fixture = ensure_fixture(wd, sections, max(64 if quick else 2048, (batches + 1) * batch_size))
        plain, maps = build_datasets(cfg, fixture)
        if len(plain) < (batches + 1) * batch_size:
            raise ValueError(f"{fixture.root}/train has {len(plain)} images; {batches + 1} batches of {batch_size} need more")
        pin = torch.cuda.is_available()
        samples = interleave({"without": LoaderRate(plain, batch_size, workers, batches, pin),
                              "with": LoaderRate(maps, batch_size, workers, batches, pin)}, rounds, warmup=0 if quick else 1)
        store_info = {"grid": list(maps.store.grid), "k": int(maps.store.index["k"]),
                      "bytes_per_image": maps.store.bytes_per_image()}
    bench.sample_load()
    ratio = summary(paired_ratios(samples["with"], samples["without"]))
    results = {"without_score_maps_img_s": summary(samples["without"], 1), "with_score_maps_img_s": summary(samples["with"], 1),
               "ratio": ratio, "score_maps": store_info}
    table = markdown_table(("loader", "images/s (median)", "q25–q75"), [
        ("without score maps", f"{results['without_score_maps_img_s']['median']:.0f}",
         f"{results['without_score_maps_img_s']['q25']:.0f}–{results['without_score_maps_img_s']['q75']:.0f}"),
        ("with score maps", f"{results['with_score_maps_img_s']['median']:.0f}",
         f"{results['with_score_maps_img_s']['q25']:.0f}–{results['with_score_maps_img_s']['q75']:.0f}"),
        ("ratio with / without", f"{ratio['median']:.3f}", f"{ratio['q25']:.3f}–{ratio['q75']:.3f}")])
    settings = {"preset": preset, "row": ROW, "batch_size": batch_size, "batches_per_round": batches, "rounds": rounds,
                "workers": workers, "images": len(plain), "img_size": cfg["img_size"], "rand_augment": cfg.get("rand_augment"),
                "reprob": cfg.get("reprob"), "data_root": str(fixture.root), "store": str(fixture.store)}
    targets = [Target("data: loader images/s with / without score maps", ratio["median"], ">=", TARGET)]
    return bench.finish(settings=settings, results=results, targets=targets, tables=[table])
