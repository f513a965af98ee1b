"""The preset's annotator applied to one split: what the `scoremaps` stage and a `tlvit launch --scoremaps` shard run.

One function, so that a Slurm array's shards and the DVC stage write stores of exactly the same settings: the
stage then finds a store the array published and computes nothing (`ScoreMapWriter`'s published shortcut).
"""
from __future__ import annotations

import json

from tlvit.config import load_params, preset_section
from tlvit.layout import Layout


def annotate_split(split: str, params_path: str = "params.yaml", *, shard: int = 0, num_shards: int = 1):
    """Score maps of `split` under the params' preset into `scoremaps/<preset>/annotator/<split>`.

    Returns the store, or None while other shards still write theirs (the last one publishes it).
    """
    from tlvit.data.datasets import DATA_STATS, DenseLabelDataset, WholeImageGeometry
    from tlvit.labels.annotator import build_annotator, generate_score_maps

    params = load_params(params_path)
    cfg = preset_section(params, params_path=params_path)["scoremaps"]
    layout = Layout(params["preset"])
    data = layout.dataset()
    meta_file = layout.annotator_dir / "annotator.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: the annotator stage has not run for preset {params['preset']!r}; "
                                "run `dvc repro annotator` first")
    meta = json.loads(meta_file.read_text())
    model = build_annotator(meta["model"], meta["num_classes"], checkpoint=meta["weights"])
    mean, std = DATA_STATS[data["kind"]]
    ds = DenseLabelDataset(data["root"], split, WholeImageGeometry(meta["input_size"]), mean, std)
    return generate_score_maps(model, ds, layout.score_maps("annotator", split), k=cfg["topk"], batch_size=cfg["batch_size"],
                               device=None, shard=shard, num_shards=num_shards,
                               meta={"annotator": meta["model"], "checkpoint_sha256": meta["weights_sha256"],
                                     "input_size": meta["input_size"]})
