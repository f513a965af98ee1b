"""Stage `data`: the embedded canvases, or a validated pointer to an ImageFolder (ImageNet)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import run_stage
from tlvit.config import load_params, preset_section
from tlvit.data.canvases import CanvasSpec, write_canvases
from tlvit.data.datasets import index_split
from tlvit.io import write_json
from tlvit.layout import Layout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["data"]
    layout = Layout(params["preset"])
    if section["kind"] == "canvases":
        stats = write_canvases(layout.data_dir / "canvases", CanvasSpec.from_params(section))
        # the root is relative to the repository, so the whole checkout can move
        write_json(layout.dataset_file, {"kind": "canvases", "root": str(layout.data_dir / "canvases"), "splits": stats})
    elif section["kind"] == "imagefolder":
        root = Path(section["root"])
        counts = {split: len(index_split(root, split)[0]) for split in ("train", "val")}  # fails naming the path
        write_json(layout.dataset_file, {"kind": "imagefolder", "root": str(root.resolve()), "splits": counts})
    else:
        raise SystemExit(f"{args.params}: presets.{params['preset']}.data.kind must be 'canvases' or 'imagefolder'")
    print(f"data: {layout.dataset_file}")


if __name__ == "__main__":
    run_stage(main)
