"""The dense labels themselves: the annotator's accuracy table and a picture of a few val canvases.

Figure columns: the image (with the random crop's box), the annotator's argmax map (the stored top-1
class per location, shaded by its probability), the ground-truth class map (embedded canvases only),
the crop as the model sees it, and the token labels of that crop (the score map resampled through the
crop's affine `theta`, exactly what token labeling trains on, `tlvit.labels.geometry`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tlvit.layout import Layout


def dense_label_table(layout: Layout) -> str | None:
    """Markdown table of the annotator's accuracy (image-level and dense, per split), if measured."""
    ann, maps = layout.metrics_dir / "annotator.json", layout.metrics_dir / "scoremaps.json"
    if not maps.is_file():
        return None
    m = json.loads(maps.read_text())
    a = json.loads(ann.read_text()) if ann.is_file() else {}
    rows = []
    for split in ("train", "val"):
        if f"{split}_dense_acc" in m:
            rows.append({"split": split, "dense-label accuracy (%)": m[f"{split}_dense_acc"],
                         "on primary-digit pixels": m[f"{split}_dense_acc_primary"],
                         "on secondary-digit pixels": m[f"{split}_dense_acc_secondary"]})
    head = (f"Annotator image-level val top-1: {a.get('val_top1', '—')}% ({a.get('epochs', '—')} epochs, "
            f"{a.get('train_time_s', '—')} s). Score maps: grid {m.get('grid')}, {m.get('bytes_per_image')} bytes/image.\n\n")
    return head + (pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f") if rows else "") + "\n"


def _class_colors(num_classes: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def _paint(classes: np.ndarray, conf: np.ndarray | None, colors, background: int | None = None) -> np.ndarray:
    """RGB image [h, w, 3] of a class map; conf in [0, 1] fades a cell towards white; `background` -> light grey."""
    rgb = np.ones((*classes.shape, 3))
    for c, col in enumerate(colors):
        rgb[classes == c] = col[:3]
    if conf is not None:
        rgb = 1 - (1 - rgb) * np.clip(conf, 0, 1)[..., None]
    if background is not None:
        rgb[classes == background] = 0.85
    return rgb


def dense_label_figure(layout: Layout, path: Path, token_grid: tuple[int, int], img_size: int, *, n: int = 4,
                       seed: int = 0, crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3)) -> str | None:
    """Draw `n` val canvases with their dense labels; returns None when drawn, else why it was skipped."""
    import torch
    from PIL import Image

    from tlvit.data.datasets import TrainGeometry, index_split
    from tlvit.labels.geometry import resample_label_maps
    from tlvit.labels.score_maps import ScoreMapError, ScoreMapStore, topk_to_dense
    from tlvit.report.figures import _plt, save

    try:
        data = layout.dataset()
        store = ScoreMapStore(layout.score_maps("annotator", "val"))
    except (FileNotFoundError, ScoreMapError) as e:
        return f"no data or score maps yet ({e})"
    root = Path(data["root"])
    paths, targets, _ = index_split(root, "val")
    gt = None
    if data.get("kind") == "canvases":
        from tlvit.data.canvases import BACKGROUND, load_gt_maps

        gt_paths, gt_maps, _ = load_gt_maps(root, "val")
        gt = dict(zip(gt_paths, gt_maps))
    C = store.num_classes
    colors = _class_colors(C)
    picks = np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False)
    geometry = TrainGeometry(img_size, tuple(crop_scale), tuple(crop_ratio), hflip=0.0)
    plt = _plt()
    cols = ["image + crop box", "annotator argmax map", "ground truth", "random crop", f"token labels {token_grid[0]}x{token_grid[1]}"]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.3 * len(cols), 2.4 * len(picks)), squeeze=False)
    for k, i in enumerate(picks):
        img = Image.open(root / "val" / paths[i]).convert("RGB")
        logits, classes = store.read(int(i))
        dense = topk_to_dense(torch.from_numpy(logits)[None], torch.from_numpy(classes)[None], C)[0]  # [C, h, w]
        conf, arg = dense.max(0)
        torch.manual_seed(seed * 1000 + int(i))
        crop, theta, clips = geometry(img)
        cells, _ = resample_label_maps(dense[None], theta[None], token_grid, clips=clips[None])
        tconf, targ = cells[0].max(0)
        ax = axes[k]
        ax[0].imshow(img)
        _draw_box(ax[0], theta, img.size)
        ax[0].set_ylabel(f"val #{i}, label {targets[i]}", fontsize=8)
        ax[1].imshow(_paint(arg.numpy(), conf.numpy(), colors), interpolation="nearest")
        if gt is not None:
            ax[2].imshow(_paint(gt[paths[i]], None, colors, background=BACKGROUND), interpolation="nearest")
        else:
            ax[2].text(0.5, 0.5, "no ground truth\n(ImageNet)", ha="center", va="center", fontsize=8)
        ax[3].imshow(crop)
        ax[4].imshow(_paint(targ.numpy(), tconf.numpy(), colors), interpolation="nearest")
        if token_grid[0] * token_grid[1] <= 196:
            for (y, x), c in np.ndenumerate(targ.numpy()):
                ax[4].text(x, y, str(c), ha="center", va="center", fontsize=5 if token_grid[0] > 8 else 7)
        for a, title in zip(ax, cols):
            a.set_xticks([])
            a.set_yticks([])
            if k == 0:
                a.set_title(title, fontsize=8)
    if C <= 20:  # with more classes the colours repeat; the class ids are written in the token cells
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in range(C)]
        fig.legend(handles, [str(c) for c in range(C)], loc="lower center", ncol=C, fontsize=7, title="class",
                   title_fontsize=7)
    fig.suptitle(f"Dense labels on val canvases (preset {layout.preset}): annotator top-1 shaded by its probability; "
                 "token labels = the map resampled through the crop", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save(fig, path)
    return None


def _draw_box(ax, theta, size_wh) -> None:
    """The crop's outline on the source image: theta maps output corners to source coordinates."""
    W, H = size_wh
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)]
    t = theta.double().numpy()
    xs, ys = [], []
    for u, v in corners:
        x, y = t @ np.array([u, v, 1.0])
        xs.append((x + 1) / 2 * W - 0.5)
        ys.append((y + 1) / 2 * H - 0.5)
    ax.plot(xs, ys, color="red", lw=1)
