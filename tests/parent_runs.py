"""A trained parent for the dense fine-tune tests (segmentation, detection)."""
import copy
import json
from pathlib import Path

import torch

from tlvit.config import load_params, resolve_run_config
from tlvit.layout import Layout
from tlvit.train import RunInputs, train

REPO = Path(__file__).resolve().parents[1]


def tiny_parent_run(root: Path, canvases: Path):
    """A finished 1-epoch run of a tiny DeiT analog on `canvases`, laid out as preset `t`'s row `deit_s_cutmix` under
    `root`; returns its Layout and the repository's params."""
    layout = Layout("t", root)
    layout.dataset_file.parent.mkdir(parents=True)
    layout.dataset_file.write_text(json.dumps({"kind": "canvases", "root": str(canvases)}))
    params = load_params(REPO / "params.yaml")
    cfg = copy.deepcopy(resolve_run_config(params, "deit_s_cutmix", preset="smoke",
                                           rows_path=REPO / "experiments" / "rows.yaml", params_path=REPO / "params.yaml"))
    cfg.update(epochs=1, warmup_epochs=0, batch_size=16, workers=0,
               model_kwargs={"depth": 2, "embed_dim": 24, "num_heads": 2})
    torch.set_num_threads(1)
    res = train(cfg, 0, layout.run_dir("deit_s_cutmix", 0), RunInputs(canvases, "canvases"), tracking=False,
                show_progress=False)
    layout.row_metrics("deit_s_cutmix").parent.mkdir(parents=True)
    layout.row_metrics("deit_s_cutmix").write_text(json.dumps({"runs": [{"seed": 0, "top1": res["top1"]}]}))
    return layout, params
