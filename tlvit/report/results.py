"""What has been reproduced so far: each row's seeds, status and provenance, found by row id or config hash.

A row is `done` when `metrics/<preset>/rows/<row>.json` exists and was written for the row's current
config, `stale` when that file belongs to an older config (shown, but never as a number), `pending`
when nothing was run. A row without its own file is also done when another row with the same config hash
ran (two names for one configuration train once, see `tlvit.tables.all_rows`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tlvit.config import ConfigError, config_hash, load_rows, resolve_run_config
from tlvit.layout import Layout

log = logging.getLogger(__name__)

DONE, PENDING, STALE = "done", "pending", "stale"


@dataclass
class RowResult:
    row: str
    status: str  # done | pending | stale
    metrics: dict | None = None  # the row metrics file (also for stale rows)
    expected_hash: str | None = None  # config hash of the row's current config under the preset
    source_row: str | None = None  # the row id whose metrics file this is (another one for a shared config)
    cfg: dict | None = None  # resolved config (None when it cannot be resolved)
    note: str = ""

    @property
    def done(self) -> bool:
        return self.status == DONE

    def values(self, key: str = "top1") -> list[float] | None:
        """Per-seed values of `key` (None unless done)."""
        if not self.done:
            return None
        return [run[key] for run in self.metrics["runs"] if run.get(key) is not None]

    @property
    def runs(self) -> list[dict]:
        return self.metrics["runs"] if self.metrics else []


@dataclass
class Results:
    """Row results of one preset; configs are resolved once per row."""

    layout: Layout
    params: dict
    rows_path: str | Path = "experiments/rows.yaml"
    params_path: str | Path = "params.yaml"
    _cache: dict = field(default_factory=dict)

    @cached_property
    def _by_hash(self) -> dict[str, tuple[str, dict]]:
        """config hash -> (row id, metrics) of every row metrics file of the preset."""
        out = {}
        for path in sorted((self.layout.metrics_dir / "rows").glob("*.json")):
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            out.setdefault(m.get("config_hash"), (path.stem, m))
        return out

    @cached_property
    def defined_rows(self) -> dict:
        return load_rows(self.rows_path)

    def config(self, row: str) -> dict | None:
        """The row's resolved config under the preset, or None when it does not resolve."""
        try:
            return resolve_run_config(self.params, row, preset=self.layout.preset, rows_path=self.rows_path,
                                      params_path=self.params_path)
        except ConfigError as e:
            log.warning("report: %s", e)
            return None

    def get(self, row: str) -> RowResult:
        if row not in self._cache:
            self._cache[row] = self._load(row)
        return self._cache[row]

    def _load(self, row: str) -> RowResult:
        cfg = self.config(row)
        expected = config_hash(cfg) if cfg else None
        path = self.layout.row_metrics(row)
        m = json.loads(path.read_text()) if path.is_file() else None
        if m is not None and (expected is None or m.get("config_hash") == expected):
            note = "" if expected else "config does not resolve; shown as recorded"
            return RowResult(row, DONE, m, expected, row, cfg, note)
        if expected in self._by_hash:
            other, m2 = self._by_hash[expected]
            return RowResult(row, DONE, m2, expected, other, cfg, f"same config as {other}")
        if m is not None:
            return RowResult(row, STALE, m, expected, row, cfg,
                             f"metrics are for config {m.get('config_hash')}, the row is now {expected}: re-run it")
        return RowResult(row, PENDING, None, expected, None, cfg)

    def memo(self, key, make):
        """`make()` once per key for this report (e.g. a row's curves, drawn in several tables)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def num_classes(self) -> int:
        """Classes of the preset's dataset: the train split's class folders, else 10 (canvases) / 1000."""
        try:
            root = Path(self.layout.dataset()["root"]) / "train"
            n = sum(1 for p in root.iterdir() if p.is_dir())
            if n:
                return n
        except (FileNotFoundError, OSError, KeyError):
            pass
        kind = self.params["presets"][self.layout.preset]["data"].get("kind")
        return 10 if kind == "canvases" else 1000

    def params_m(self, row: str) -> float | None:
        """Parameters (millions) of the row's model as built for this preset (meta device: no memory)."""
        key = ("params", row)
        if key not in self._cache:
            self._cache[key] = _count_params(self.get(row).cfg, self.num_classes())
        return self._cache[key]


def _count_params(cfg: dict | None, num_classes: int) -> float | None:
    if cfg is None:
        return None
    import torch

    from tlvit.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg, num_classes)
    except Exception as e:  # a model that does not build is reported, not fatal to the report
        log.warning("report: row %s does not build (%s)", cfg.get("row"), e)
        return None
    return sum(p.numel() for p in model.parameters()) / 1e6
