"""Dense score maps on disk: top-k logits (fp16) + class ids per location, memory-mapped, with an index.

Layout of a store directory (one per split):
  index.json    relative image paths, image sizes, num_classes, annotator, checkpoint sha256,
                input size, grid, k (verified against the dataset on load)
  logits.npy    float16 [N, k, h, w]   the annotator's top-k logits at each location
  classes.npy   uint8/int16 [N, k, h, w]  their class ids (smallest type that holds num_classes)

Written resumably: `ScoreMapWriter` fills preallocated arrays in `<dir>.partial/` chunk by chunk and
marks finished chunks; a killed run continues where it stopped, several shards can fill one store,
and the directory only appears under its final name when every image is done.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tlvit.labels.geometry import LabelMaps

INDEX = "index.json"


class ScoreMapError(RuntimeError):
    """A store that is missing, incomplete or does not match the dataset."""


def class_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned/signed integer type that holds class ids 0..num_classes-1."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16) if num_classes <= 32768 else np.dtype(np.int32)


class ScoreMapStore:
    """Read side: memory-mapped arrays + verified index."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            partial = self.root.with_name(self.root.name + ".partial")
            hint = f" (an unfinished run is in {partial}: re-run the scoremaps stage to finish it)" if partial.exists() else ""
            raise ScoreMapError(f"{self.root}: no score-map store here{hint}; run `dvc repro scoremaps`")
        self.index = json.loads(index_path.read_text())
        self._open_maps()

    def _open_maps(self) -> None:
        # Plain ndarray views of the memory maps (they keep the maps open): slicing a np.memmap runs its
        # Python-level __getitem__/__array_finalize__ on every read, which measured half of a sample's
        # map-reading time inside a training loader (8.5-9.5 vs 4.0 us).
        self.logits = np.load(self.root / "logits.npy", mmap_mode="r").view(np.ndarray)
        self.classes = np.load(self.root / "classes.npy", mmap_mode="r").view(np.ndarray)
        n = len(self.index["paths"])
        if self.logits.shape[0] != n or self.classes.shape != self.logits.shape:
            raise ScoreMapError(
                f"{self.root}: arrays {self.logits.shape}/{self.classes.shape} do not match the index's {n} images; "
                "the store is corrupt: delete it and re-run `dvc repro scoremaps`"
            )

    def __getstate__(self) -> dict:
        # Loader workers started by spawn/forkserver (Python 3.14's default on Linux) receive the dataset
        # pickled: send where the maps are, not their bytes (gigabytes on ImageNet), and map them again there.
        return {k: v for k, v in self.__dict__.items() if k not in ("logits", "classes")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_maps()

    def __len__(self) -> int:
        return len(self.index["paths"])

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.logits.shape[2:])  # type: ignore[return-value]

    def regenerate_command(self, split_dir: str | Path) -> str:
        """The `tlvit scoremaps` command that rewrites this store for the images of `split_dir` (<root>/<split>)."""
        split_dir = Path(split_dir)
        ckpt = self.index.get("checkpoint_sha256")
        weights = "" if ckpt in (None, "timm-pretrained") else " --checkpoint <the annotator's weights file>"
        return (f"tlvit scoremaps --data {split_dir.parent} --split {split_dir.name} --annotator {self.index.get('annotator')}"
                f"{weights} --input-size {self.index.get('input_size')} --topk {self.index.get('k')} --out {self.root}")

    def verify(self, rel_paths: Sequence[str], dataset_root: str | Path, num_classes: int | None = None) -> None:
        """Fail with the first mismatch between the store's index and the images of `dataset_root` (<root>/<split>)."""
        stored = self.index["paths"]
        fix = f"regenerate the store for this dataset (`dvc repro scoremaps`, or `{self.regenerate_command(dataset_root)}`)"
        if num_classes is not None and num_classes != self.num_classes:
            raise ScoreMapError(f"{self.root}: store has {self.num_classes} classes, dataset {dataset_root} has {num_classes}; {fix}")
        for i, (a, b) in enumerate(zip(stored, rel_paths)):
            if a != b:
                raise ScoreMapError(f"{self.root}: image #{i} is {a!r} in the store but {b!r} in {dataset_root}; {fix}")
        if len(stored) != len(rel_paths):
            which = "store" if len(stored) > len(rel_paths) else "dataset"
            first = (stored if which == "store" else list(rel_paths))[min(len(stored), len(rel_paths))]
            raise ScoreMapError(
                f"{self.root}: store has {len(stored)} images, {dataset_root} has {len(rel_paths)} "
                f"(first extra one in the {which}: {first!r}); {fix}"
            )

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits [k, h, w] float16, classes [k, h, w]) of image i, copied out of the memory map."""
        return self.logits[i].copy(), self.classes[i].copy()

    def bytes_per_image(self) -> float:
        return (self.logits[0].nbytes + self.classes[0].nbytes)


class ScoreMapWriter:
    """Resumable, shardable, chunked writer of a store (see module docstring).

    Chunk c is done when `<dir>.partial/done/<c>` exists (created atomically after its data is flushed),
    so several processes (`shard=i, num_shards=n`: GPUs, Slurm array tasks) can fill one store: each
    takes the chunks c with c % n == i. Creating the arrays happens once, under a file lock.
    """

    def __init__(self, root: str | Path, *, num_images: int, k: int, grid: tuple[int, int], num_classes: int,
                 meta: dict, chunk: int = 256):
        self.root = Path(root)
        self.partial = self.root.with_name(self.root.name + ".partial")
        self.chunk = chunk
        self.num_chunks = (num_images + chunk - 1) // chunk
        shape = (num_images, k, *grid)
        self.meta = {**meta, "num_classes": num_classes, "k": k, "grid": list(grid), "num_images": num_images, "chunk": chunk}
        _check_replaceable(self.root)  # before any work: what is at `root` now is replaced when the store is done
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(json.dumps(self.meta))
        # held (shared) while this writer lives: a writer with other settings cannot discard its chunks
        self._active = open(self.partial.with_name(self.partial.name + ".active"), "a")
        try:
            self.published = self._claim(wanted, shape, num_classes)
        except BaseException:  # whatever stops it, this writer holds no lock afterwards
            self._active.close()
            raise
        if self.published:
            return
        self.logits = np.load(self.partial / "logits.npy", mmap_mode="r+")
        self.classes = np.load(self.partial / "classes.npy", mmap_mode="r+")

    def _claim(self, wanted: dict, shape: tuple, num_classes: int) -> bool:
        """Under the store's lock: True when the same settings are already published; else hold the partial
        store (creating it, or replacing one of other settings that nobody writes any more) and return False."""
        with _locked(self.partial.with_name(self.partial.name + ".lock")):
            index = json.loads((self.root / INDEX).read_text()) if (self.root / INDEX).is_file() else None
            # the same settings and images already published (e.g. a shard re-run): nothing to compute. Only
            # writers that fingerprint their images (generate_score_maps) can know the images are the same.
            published = not self.partial.exists() and index is not None and "images_sha256" in wanted and all(
                index.get(key) == value for key, value in wanted.items())
            if published:
                fcntl.flock(self._active, fcntl.LOCK_SH)
                return True
            meta_path = self.partial / "meta.json"
            if self.partial.exists() and (not meta_path.is_file() or json.loads(meta_path.read_text()) != wanted):
                try:  # left by a run with other settings: reusable only if nobody is still writing it
                    fcntl.flock(self._active, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ScoreMapError(f"{self.root}: another process is writing this store with other settings "
                                        f"({self.partial}); wait for it or stop it, or choose another output") from None
                shutil.rmtree(self.partial)
            fcntl.flock(self._active, fcntl.LOCK_SH)
            if not self.partial.exists():
                tmp = self.partial.with_name(self.partial.name + ".init")
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "done").mkdir(parents=True)
                arrays = {"logits.npy": np.dtype(np.float16), "classes.npy": np.dtype(class_dtype(num_classes))}
                _reserve_space(tmp, sum(int(np.prod(shape)) * d.itemsize for d in arrays.values()))
                for name, dtype in arrays.items():
                    np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape).flush()
                    _allocate(tmp / name)  # real blocks now: a full disk fails here, not as a bus error mid-run
                (tmp / "meta.json").write_text(json.dumps(self.meta))
                os.replace(tmp, self.partial)
        return False

    def is_done(self, c: int) -> bool:
        return self.published or (self.partial / "done" / str(c)).exists()

    def pending_chunks(self, shard: int = 0, num_shards: int = 1) -> list[int]:
        """Chunks not written yet; with shards, only this shard's share (c % num_shards == shard)."""
        return [c for c in range(shard, self.num_chunks, num_shards) if not self.is_done(c)]

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk, min((c + 1) * self.chunk, self.meta["num_images"]))

    def write_chunk(self, c: int, logits: np.ndarray, classes: np.ndarray) -> None:
        """Store a finished chunk; it counts as done only after its data is flushed to disk."""
        r = self.chunk_range(c)
        self.logits[r.start : r.stop] = logits
        self.classes[r.start : r.stop] = classes
        self.logits.flush()
        self.classes.flush()
        (self.partial / "done" / str(c)).touch()

    def finish(self, paths: Sequence[str], sizes: Sequence[tuple[int, int]]) -> ScoreMapStore | None:
        """Write the index and move the store to its final name once every chunk is done.

        Returns None while other shards still have chunks to write (the last shard to finish moves it).
        """
        if self.published:
            self._active.close()
            return ScoreMapStore(self.root)
        with _locked(self.partial.with_name(self.partial.name + ".lock")):
            if self.root.is_dir() and not self.partial.exists():
                self._active.close()
                return ScoreMapStore(self.root)  # another shard finished it
            missing = [c for c in range(self.num_chunks) if not self.is_done(c)]
            if missing:
                return None
            del self.logits, self.classes
            index = {**self.meta, "paths": list(paths), "sizes": [list(s) for s in sizes]}
            (self.partial / INDEX).write_text(json.dumps(index))
            (self.partial / "meta.json").unlink(missing_ok=True)
            shutil.rmtree(self.partial / "done")
            if self.root.exists():
                _check_replaceable(self.root)
                shutil.rmtree(self.root)  # an older store of ours
            os.replace(self.partial, self.root)
            # a shard still waiting holds its own handle to the lock; a later one sees the published store
            self.partial.with_name(self.partial.name + ".lock").unlink(missing_ok=True)
            self._active.close()
            self.partial.with_name(self.partial.name + ".active").unlink(missing_ok=True)
            return ScoreMapStore(self.root)


def _reserve_space(where: Path, needed: int) -> None:
    """One clear error when the store cannot fit, before any work is done."""
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ScoreMapError(f"{where.parent}: no space left on the device for the score maps: {needed / 1e9:.2f} GB "
                            f"needed, {free / 1e9:.2f} GB free; free space or choose another output directory")


def _allocate(path: Path) -> None:
    """Back a freshly created (sparse) memmap file with disk blocks where the filesystem can."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ScoreMapError(f"{path.parent.parent}: no space left on the device for the score maps; "
                                        "free space or choose another output directory") from e
                # EOPNOTSUPP etc.: the filesystem cannot preallocate; the check above stands


def _check_replaceable(root: Path) -> None:
    """A store may replace an older store (it has an index) or an empty directory, never anything else."""
    if root.is_file() or (root.is_dir() and not (root / INDEX).is_file() and any(root.iterdir())):
        raise ScoreMapError(f"{root}: exists and is not a score-map store (no {INDEX}); refusing to replace it: "
                            "choose another output directory, or move it away yourself")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (fcntl) on `path` while the block runs."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def topk_label_maps(logits: torch.Tensor, classes: torch.Tensor, num_classes: int, absent: str = "zero_prob") -> LabelMaps:
    """Class probabilities from stored top-k logits/classes [B, k, h, w], kept top-k (`LabelMaps`).

    absent="zero_prob": softmax over the k stored logits, classes outside the top-k get 0 (default).
    absent="zero_logit": the original code's behaviour: scatter logits into zeros and softmax over all
    C classes, so absent classes get logit 0 and leak probability (kept as a switch for comparison).
    """
    logits = logits.float()
    classes = classes.long()
    absent_count = num_classes - logits.shape[1]
    if absent not in ("zero_prob", "zero_logit"):
        raise ValueError(f"absent_classes must be 'zero_prob' or 'zero_logit', not {absent!r}")
    if absent == "zero_prob" or absent_count == 0:
        return LabelMaps(logits.softmax(1), classes, num_classes)
    # softmax over C logits of which C - k are 0: the k stored ones and one of log(C - k) stand for all
    lse = torch.cat([logits, torch.full_like(logits[:, :1], math.log(absent_count))], 1).logsumexp(1, keepdim=True)
    rest = (-lse).exp()  # e^0 / Z: every absent class's probability, also counted for the listed ones
    return LabelMaps((logits - lse).exp() - rest, classes, num_classes, rest)


def topk_logit_maps(logits: torch.Tensor, classes: torch.Tensor, num_classes: int, absent: str = "zero_logit") -> LabelMaps:
    """The stored logits themselves as `LabelMaps` values, for pooling *logits* (`supervision.pooling: logits`).

    The original code's label pooling: the top-k logits scattered into a dense map of zeros, pooled,
    then a softmax. Resampling these values (`resample_label_maps`) averages that dense logit map;
    the caller takes the softmax over classes afterwards. Absent classes hold logit 0 (absent=
    "zero_logit", the original's fill). A softmax over the stored top-k alone ("zero_prob") has no
    logit for absent classes to average, so it is refused unless the store keeps every class.
    """
    if absent not in ("zero_prob", "zero_logit"):
        raise ValueError(f"absent_classes must be 'zero_prob' or 'zero_logit', not {absent!r}")
    if absent == "zero_prob" and logits.shape[1] < num_classes:
        raise ValueError(f"pooling logits needs absent_classes: zero_logit when the store keeps {logits.shape[1]} of "
                         f"{num_classes} classes (absent classes have no logit to pool); set supervision.absent_classes: "
                         "zero_logit, or supervision.pooling: probs")
    return LabelMaps(logits.float(), classes.long(), num_classes)


def topk_to_dense(logits: torch.Tensor, classes: torch.Tensor, num_classes: int, absent: str = "zero_prob") -> torch.Tensor:
    """Class probabilities [B, C, h, w] (see `topk_label_maps`); for looking at maps, not for training."""
    probs, classes, C, rest = topk_label_maps(logits, classes, num_classes, absent)
    B, _, h, w = probs.shape
    dense = probs.new_zeros(B, C, h, w) if rest is None else rest.expand(B, C, h, w).clone()
    return dense.scatter_add_(1, classes, probs)
