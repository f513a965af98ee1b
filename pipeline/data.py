"""Stage `data`: the embedded canvases, or a validated pointer to an ImageFolder (ImageNet)."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from pipeline import run_stage
from tlvit.config import load_params, preset_section
from tlvit.data.canvases import CanvasSpec, write_canvases
from tlvit.data.datasets import index_split
from tlvit.io import tree_digest, write_json
from tlvit.layout import Layout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    section = preset_section(params, params_path=args.params)["data"]
    layout = Layout(params["preset"])
    if section["kind"] == "canvases":
        canvases = layout.data_dir / "canvases"
        stats = write_canvases(canvases, CanvasSpec.from_params(section))
        # the root is relative to the repository, so the whole checkout can move. Later stages depend on this
        # file alone (dvc.yaml), so it carries a digest of every image and map: new data, new dataset.json.
        write_json(layout.dataset_file, {"kind": "canvases", "root": str(canvases), "splits": stats,
                                         "digest": tree_digest(canvases)})
    elif section["kind"] == "imagefolder":
        root = Path(section["root"])
        index = {split: index_split(root, split) for split in ("train", "val")}  # fails naming the path
        # ImageNet lies outside the repository and DVC: the digest covers its listing (paths, classes), not
        # 150 GB of contents, so added, removed or relabelled images re-run the later stages.
        listing = hashlib.md5(json.dumps({s: i[:2] for s, i in index.items()}).encode()).hexdigest()
        write_json(layout.dataset_file, {"kind": "imagefolder", "root": str(root.resolve()),
                                         "splits": {s: len(i[0]) for s, i in index.items()}, "digest": listing})
    else:
        raise SystemExit(f"{args.params}: presets.{params['preset']}.data.kind must be 'canvases' or 'imagefolder'")
    print(f"data: {layout.dataset_file}")


if __name__ == "__main__":
    run_stage(main)
