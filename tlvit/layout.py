"""Where each pipeline stage reads and writes, per preset (one place, used by stages, CLI and tests)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    preset: str
    root: Path = Path(".")

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / self.preset

    @property
    def dataset_file(self) -> Path:
        """JSON written by the data stage: {kind, root, ...}; every later stage finds the images through it."""
        return self.data_dir / "dataset.json"

    @property
    def annotator_dir(self) -> Path:
        return self.root / "models" / self.preset / "annotator"

    def score_maps(self, source: str, split: str) -> Path:
        """source: 'annotator' (the machine annotator) or 'oracle' (ground-truth maps, embedded only)."""
        return self.root / "scoremaps" / self.preset / source / split

    def run_dir(self, row: str, seed: int) -> Path:
        return self.root / "runs" / self.preset / row / f"seed{seed}"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics" / self.preset

    def row_metrics(self, row: str) -> Path:
        return self.metrics_dir / "rows" / f"{row}.json"

    def row_summary(self, row: str) -> Path:
        """The row's numbers alone (DVC's metrics: `dvc metrics show/diff`)."""
        return self.metrics_dir / "summary" / f"{row}.json"

    def row_curves(self, row: str) -> Path:
        """Per-epoch means over seeds (DVC's plots: `dvc plots show/diff`)."""
        return self.metrics_dir / "curves" / f"{row}.csv"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports" / self.preset

    def dataset(self) -> dict:
        if not self.dataset_file.is_file():
            raise FileNotFoundError(f"{self.dataset_file}: no dataset for preset {self.preset!r}; run `dvc repro data`")
        info = json.loads(self.dataset_file.read_text())
        root = Path(info["root"])
        info["root"] = root if root.is_absolute() else self.root / root
        return info
