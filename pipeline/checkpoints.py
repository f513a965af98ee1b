"""Stage `checkpoints`: the released checkpoints of experiments/checkpoints.yaml found in the preset's
`checkpoints.dir`, evaluated on its val split, and every listed model's params and GMACs as built; writes
metrics/<preset>/checkpoints.json (the report renders it in reports/<preset>/checkpoints.md). It reads no trained
row, so `dvc repro checkpoints` never trains anything."""
from __future__ import annotations

import argparse
import datetime as dt

from pipeline import run_stage
from tlvit.checkpoint_eval import load_released, measure_released
from tlvit.checkpoint_table import render_checkpoint_table
from tlvit.config import load_params, preset_section
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoints", default="experiments/checkpoints.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["checkpoints"]
    layout = Layout(params["preset"])
    data = layout.dataset()
    # only an ImageNet val split fits the released 1000-class heads; elsewhere the rows keep params and GMACs
    imagenet = data["kind"] == "imagefolder"
    rows = measure_released(load_released(args.checkpoints), section["dir"], data["root"] if imagenet else None,
                            real_labels=section.get("real_labels"), batch_size=section["batch_size"])
    record = {"preset": params["preset"], "source": "released", "dir": section["dir"], "data": str(data["root"]),
              "commit": git_commit(), "date": dt.date.today().isoformat(), "rows": rows}
    write_json(layout.metrics_dir / "checkpoints.json", record)
    print(render_checkpoint_table(record))  # also in reports/<preset>/checkpoints.md once the report stage runs
    done = sum(r["status"] == "evaluated" for r in rows)
    print(f"checkpoints: {done} of {len(rows)} released checkpoints evaluated -> {layout.metrics_dir / 'checkpoints.json'}")


if __name__ == "__main__":
    run_stage(main)
