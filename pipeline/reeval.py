"""Stage `reeval`: each trained row's checkpoint (first seed) evaluated again as `tlvit eval` does, next to the
top-1 its training logged for the same weights (they must agree exactly); writes metrics/<preset>/reeval.json
(rendered in reports/<preset>/checkpoints.md)."""
from __future__ import annotations

import argparse
import datetime as dt

from pipeline import run_stage
from tlvit.checkpoint_eval import measure_own_rows
from tlvit.config import load_params, pipeline_rows, preset_section
from tlvit.io import write_json
from tlvit.layout import Layout
from tlvit.provenance import git_commit


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["checkpoints"]
    layout = Layout(params["preset"])
    rows = measure_own_rows(layout, list(pipeline_rows(params)), batch_size=section["batch_size"])
    write_json(layout.metrics_dir / "reeval.json", {"preset": params["preset"], "source": "rows", "commit": git_commit(),
                                                     "date": dt.date.today().isoformat(), "rows": rows})
    same = sum(r.get("top1") is not None and r["top1"] == r.get("trained_top1") for r in rows)
    print(f"reeval: {same} of {len(rows)} rows give back their training-time top-1 exactly")


if __name__ == "__main__":
    run_stage(main)
