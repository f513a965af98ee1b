"""TL-Align on trained DeiT and Swin checkpoints: aligned-label maps (Fig. 5 style) and per-layer RMSE (Fig. 3 style).

Both use the trained model's own attention on val images mixed by patch-aligned CutMix and
`tlvit.tl_align.LabelAligner` (variant "all", no label smoothing, as docs/tl_align.md prescribes for the
RMSE); a Swin model's labels go through `tlvit.tl_align_pyramid.PyramidLabelAligner` and its RMSE is the mean
token label's (what it trains against). Only rows whose metrics file exists (finished rows) are used, so the figures change exactly when
the report's metrics dependency does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlvit.report.results import Results

# Fig. 5 uses DeiT-S trained with TL-Align; any finished DeiT row can stand in, in this order: a model trained
# with TL-Align of any size first (its attention is what the paper shows), then DeiT-S without it.
MAP_ROWS = ("deit_s_tlalign", "deit_t_tlalign", "deit_b_tlalign", "deit_s_cutmix", "deit_s_vanilla")
# Fig. 3 compares model sizes and DeiT with Swin: per model the TL-Align row, else its baseline.
RMSE_ROWS = {"DeiT-T": ("deit_t_tlalign", "deit_t_cutmix"), "DeiT-S": ("deit_s_tlalign", "deit_s_cutmix"),
             "DeiT-B": ("deit_b_tlalign", "deit_b_mixup_cutmix"), "Swin-T": ("swin_t_tlalign", "swin_t_mixup_cutmix")}
FIGURE_MODELS = ("deit", "tlvit_deit", "swin", "tlvit_swin")  # the timm names whose checkpoints the figures read


@dataclass
class Trained:
    row: str
    seed: int
    model: object
    cfg: dict
    epoch: int


def load_trained(results: Results, row: str) -> Trained | None:
    """The first seed's checkpoint of a finished DeiT or Swin row, built for the preset's classes (eval mode)."""
    import torch

    from tlvit.models import build_model

    res = results.get(row)
    if not res.done or not res.runs:
        return None
    seed = res.runs[0]["seed"]
    path = results.layout.run_dir(res.source_row or row, seed) / "checkpoint.pt"
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    if not str(cfg.get("model", "")).startswith(FIGURE_MODELS):
        return None
    model = build_model(cfg, results.num_classes())
    model.load_state_dict(ckpt["model"])
    return Trained(row, seed, model.eval().to(_device()), cfg, ckpt.get("epoch", 0))


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _val(results: Results, cfg: dict):
    from tlvit.data.datasets import DATA_STATS, val_split

    data = results.layout.dataset()
    return val_split(cfg, data["root"], data["kind"]), *DATA_STATS[data["kind"]]


def _align(model, x, labels, num_classes: int, seed: int, lam_range=(0.0, 1.0), tries: int = 20):
    """Mix x with x.flip(0) by patch-aligned CutMix and propagate the labels: (mixed, initial labels [B, 1+N, C], aligner)."""
    import torch
    import torch.nn.functional as F

    from tlvit.mixing import mix_images
    from tlvit.models import is_pyramid
    from tlvit.tl_align import LabelAligner, initial_label_factors, initial_labels
    from tlvit.tl_align_pyramid import PyramidLabelAligner

    for t in range(tries):
        mixed = mix_images(x, "cutmix_patch", tuple(model.token_grid), torch.Generator().manual_seed(seed * 100 + t))
        if lam_range[0] <= mixed.lam <= lam_range[1]:
            break
    dev = next(model.parameters()).device
    y = F.one_hot(labels, num_classes).float().to(dev)
    mixed.images = mixed.images.to(dev)
    initial = initial_labels(y, mixed, smoothing=0.0)  # dense, for the figure
    factors = initial_label_factors(y, mixed, smoothing=0.0)  # moves 3 coefficients per token
    aligner = PyramidLabelAligner(factors, tuple(model.token_grid)) if is_pyramid(model) else LabelAligner(factors)
    with torch.no_grad():
        model.forward_train(mixed.images, attn_callback=aligner)
    return mixed, initial, aligner


def aligned_label_figure(results: Results, path: Path, *, pairs: int = 3, seed: int = 0) -> str | None:
    """Fig. 5 style: image A, image B, the mixed image, its initial and aligned token labels (share of A's class)."""
    import torch

    from tlvit.report.figures import _plt, save

    trained = next((t for t in (load_trained(results, r) for r in MAP_ROWS) if t is not None), None)
    if trained is None:
        return f"no finished DeiT row with a checkpoint yet (any of {', '.join(MAP_ROWS)})"
    ds, mean, std = _val(results, trained.cfg)
    rng = np.random.default_rng(seed)
    C = results.num_classes()
    gh, gw = trained.model.token_grid
    plt = _plt()
    cols = ["image A", "image B", "mixed (CutMix on patches)", "initial labels", "aligned (after last block)"]
    fig, axes = plt.subplots(pairs, len(cols), figsize=(2.3 * len(cols) + 1, 2.4 * pairs), squeeze=False,
                             layout="constrained")
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    show = lambda t: (t.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()  # noqa: E731
    for k in range(pairs):
        while True:  # two val images of different classes
            i, j = (int(v) for v in rng.choice(len(ds), 2, replace=False))
            if ds.targets[i] != ds.targets[j]:
                break
        a, b = ds[i], ds[j]
        x = torch.stack([a["image"], b["image"]])
        labels = torch.tensor([a["label"], b["label"]])
        mixed, initial, aligner = _align(trained.model, x, labels, C, seed + k, lam_range=(0.3, 0.7))
        ca, cb = int(labels[0]), int(labels[1])
        initial_tokens = _share(initial[0, 1:], ca, cb, (gh, gw))
        aligned_tokens = _share(aligner.token_targets()[0], ca, cb, (gh, gw))
        row = axes[k]
        row[0].imshow(show(a["image"]))
        row[1].imshow(show(b["image"]))
        row[2].imshow(show(mixed.images[0]))
        kw = dict(cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        row[3].imshow(initial_tokens, **kw)
        im = row[4].imshow(aligned_tokens, **kw)
        lam_cls = float(initial[0, 0, ca])
        aligned_cls = float(aligner.cls_target()[0, ca])
        row[0].set_ylabel(f"A: class {ca}, B: class {cb}", fontsize=8)
        row[3].set_xlabel(f"cls: λ = {lam_cls:.2f}", fontsize=8)
        row[4].set_xlabel(f"cls: aligned {aligned_cls:.2f}", fontsize=8)
        for ax, title in zip(row, cols):
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="share of A's class (red) vs B's (blue)")
    fig.suptitle(f"TL-Align label maps on {trained.row} (seed {trained.seed}, epoch {trained.epoch}; preset "
                 f"{results.layout.preset})", fontsize=9)
    save(fig, path)
    return None


def _share(y, ca: int, cb: int, grid: tuple[int, int]) -> np.ndarray:
    """[N, C] token labels -> [Gh, Gw] probability of class `ca` relative to `ca` + `cb` (1: all image A)."""
    pa, pb = y[:, ca], y[:, cb]
    return (pa / (pa + pb).clamp_min(1e-8)).reshape(grid).cpu().numpy()


def rmse_per_block(results: Results, trained: Trained, *, images: int = 256, batch: int = 64,
                   seed: int = 0) -> tuple[np.ndarray, int]:
    """(RMSE per block, images used): the RMSE between the CutMix (area) target and the TL-Align label of the class token after each block, over
    `images` val images of `trained` mixed in pairs by patch-aligned CutMix (the same images for every model)."""
    import torch

    C = results.num_classes()
    ds, _, _ = _val(results, trained.cfg)
    idx = np.random.default_rng(seed).choice(len(ds), size=min(images, len(ds) - len(ds) % 2), replace=False)
    sums, count = None, 0
    for start in range(0, len(idx), batch):
        items = [ds[int(i)] for i in idx[start:start + batch]]
        if len(items) < 2:
            continue
        x = torch.stack([it["image"] for it in items])
        labels = torch.tensor([it["label"] for it in items])
        _, _, aligner = _align(trained.model, x, labels, C, seed + start)
        r = aligner.rmse_per_layer() ** 2 * len(items)  # accumulate mean squared error, weighted by batch size
        sums = r if sums is None else sums + r
        count += len(items)
    return (sums / count).sqrt().cpu().numpy(), count


def rmse_figure(results: Results, path: Path, *, images: int = 256, batch: int = 64, seed: int = 0) -> str | None:
    """Fig. 3 style: RMSE between the CutMix (area) target and the TL-Align label of the class token, per block,
    for each DeiT size that has a finished row; left per block, right after the last block (the paper's bar)."""
    from tlvit.report.figures import _plt, save

    found = {}
    for size, candidates in RMSE_ROWS.items():
        t = next((t for t in (load_trained(results, r) for r in candidates) if t is not None), None)
        if t is not None:
            found[size] = t
    if not found:
        return "no finished DeiT-T/S/B row with a checkpoint yet"
    curves, count = {}, 0
    for size, t in found.items():
        rmse, count = rmse_per_block(results, t, images=images, batch=batch, seed=seed)
        curves[size] = (t, rmse)
    plt = _plt()
    fig, (ax_l, ax_b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for size, (t, rmse) in curves.items():
        ax_l.plot(range(1, len(rmse) + 1), rmse, marker="o", label=f"{size}: {t.row}")
    ax_l.set_xlabel("block")
    ax_l.xaxis.get_major_locator().set_params(integer=True)
    ax_l.set_ylabel("RMSE(CutMix target, aligned label)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=7)
    names = list(curves)
    sizes = [results.params_m(curves[n][0].row) for n in names]
    ax_b.bar([f"{n}\n{pm:.3g}M" if pm else n for n, pm in zip(names, sizes)], [curves[n][1][-1] for n in names],
             color="#55a868")
    for k, n in enumerate(names):
        ax_b.annotate(f"{curves[n][1][-1]:.3g}", (k, curves[n][1][-1]), ha="center", va="bottom", fontsize=7)
    ax_b.set_ylabel("RMSE after the last block")
    ax_b.set_title("per model (paper Fig. 3: falls with model size)", fontsize=9)
    fig.suptitle(f"TL-Align vs CutMix targets on {count} val images (preset {results.layout.preset}; "
                 "checkpoints: first seed of each row)", fontsize=9)
    fig.tight_layout()
    save(fig, path)
    return None
