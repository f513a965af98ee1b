"""Atomic writes: a reader never sees a half-written file, and a killed writer leaves the old one."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would have given it
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: racy with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, and set it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """Atomically write an .npz archive."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """Atomically torch.save (checkpoints survive a kill mid-write); the same object gives the same bytes.

    Saved through a file object: given a path, torch.save names the archive's records after the file,
    here a random temporary name, so identical weights hashed differently on every run (and DVC re-ran
    everything downstream of a re-trained annotator although its weights had not changed).
    """
    import torch

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as an opaque inline_container.cc error
            written, free = tmp.stat().st_size if tmp.exists() else 0, shutil.disk_usage(tmp.parent).free
            if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or free < 1 << 20:
                raise OSError(errno.ENOSPC, f"{Path(path).parent}: no space left on the device while saving "
                              f"{Path(path).name} ({written / 1e9:.2f} GB written, {free / 1e9:.2f} GB free); free "
                              "space and run again: the previous file is untouched") from e
            raise


def tree_digest(root: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """md5 over every file under `root` (relative path and contents, in sorted order), except `exclude` names.

    What the data stage records in dataset.json, so that later stages can depend on that one file instead of
    each re-reading a tree of thousands of images on every `dvc status` (the data stage's own outs still do).
    """
    root = Path(root)
    h = hashlib.md5()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.md5(path.read_bytes()).digest())
    return h.hexdigest()
