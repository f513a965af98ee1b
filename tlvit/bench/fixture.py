"""A small real dataset for the data and score-map benchmarks: embedded canvases + a score-map store.

The canvases are the preset's own (`write_canvases` with the preset's data section, fewer images);
the store is written by the real `generate_score_maps` with the preset's annotator architecture and
scoremaps settings. The annotator's weights are random: speed and store size do not depend on them.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tlvit.labels.score_maps import INDEX


class BenchDataError(ValueError):
    """The preset's data cannot be built here (e.g. ImageNet without --data)."""


@dataclass
class Fixture:
    root: Path  # ImageFolder root: <root>/train/<class>/<image>
    store: Path  # score-map store of <root>/train
    kind: str  # DATA_STATS key (canvases | imagefolder)


class Repeated(torch.utils.data.Dataset):
    """The first `n` items of a set that cycles (the benchmark's few val canvases, scored as many as asked)."""

    def __init__(self, dataset, n: int) -> None:
        self.dataset, self.n, self.num_classes = dataset, n, dataset.num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


@contextlib.contextmanager
def workdir_or_temp(workdir: str | Path | None) -> Iterator[Path]:
    """`workdir` as is, or a temporary directory removed afterwards."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="tlvit-bench-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Keep tqdm bars of the timed library code off the benchmark's output."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def build_annotator_for(sections: dict, num_classes: int, device: str | torch.device = "cpu"):
    """The preset's annotator architecture with random weights (seed 0), in eval mode."""
    from tlvit.labels.annotator import build_annotator

    torch.manual_seed(0)
    return build_annotator(sections["annotator"]["model"], num_classes).eval().to(device)


def ensure_canvases(workdir: Path, sections: dict, n_train: int) -> Path:
    """`<workdir>/canvases-<n>`: the preset's canvases with `n_train` train images (reused if present)."""
    from tlvit.data.canvases import write_canvases

    if sections["data"]["kind"] != "canvases":
        raise BenchDataError(f"preset data kind {sections['data']['kind']!r}: only embedded canvases are built here; "
                             "for the loader on real data pass --data <ImageFolder root> --score-maps <its train store>")
    root = workdir / f"canvases-{n_train}"
    if not (root / "train").is_dir():
        with quiet_progress():
            write_canvases(root, canvas_spec(sections, n_train))
    return root


def canvas_spec(sections: dict, n_train: int):
    """The spec of `ensure_canvases(workdir, sections, n_train)`'s canvases: the preset's, with fewer images."""
    from tlvit.data.canvases import CanvasSpec

    return CanvasSpec.from_params({**sections["data"], "train": n_train, "val": 20, "single": 20})


def ensure_fixture(workdir: Path, sections: dict, n_train: int) -> Fixture:
    """Canvases and their train split's score-map store under `workdir` (built once, then reused)."""
    from tlvit.data.datasets import DenseLabelDataset, WholeImageGeometry
    from tlvit.labels.annotator import generate_score_maps
    from tlvit.data.datasets import DATA_STATS

    root = ensure_canvases(workdir, sections, n_train)
    store = workdir / f"store-{n_train}"
    if not (store / INDEX).is_file():
        ann = sections["annotator"]
        mean, std = DATA_STATS["canvases"]
        ds = DenseLabelDataset(root, "train", WholeImageGeometry(ann["input_size"]), mean, std)
        model = build_annotator_for(sections, len(ds.classes))
        with quiet_progress():
            generate_score_maps(model, ds, store, k=sections["scoremaps"]["topk"],
                                batch_size=sections["scoremaps"]["batch_size"],
                                meta={"annotator": ann["model"] + " (random weights, benchmark)", "input_size": ann["input_size"]})
    return Fixture(root, store, "canvases")
