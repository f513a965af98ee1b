"""Robustness and generalisation as TL-Align Table 6 measures them (Xiao et al., "Token-Label Alignment for Vision
Transformers", ICCV 2023, arXiv:2210.06455): top-1 on ImageNet-V2, -A and -R, ImageNet-C's mean corruption error
(mCE) and accuracy under AutoAttack, plus what the embedded analogues of those sets are built from.

- mCE (Hendrycks & Dietterich, ICLR 2019): per corruption, the model's top-1 error summed over the 5 severities
  divided by AlexNet's, averaged over the 15 corruptions. AlexNet's errors (mean over severities) are the
  benchmark's published constants. Without a reference (the embedded data: no AlexNet there) the mean error itself
  is reported, under its own name.
- ImageNet-A and -R cover 200 of the 1,000 classes: as their authors evaluate, the prediction is the arg-max over
  those classes. ImageNet-V2's folders are class indices ("0".."999"), the others' WordNet ids.
- AutoAttack: the standard version (APGD-CE, APGD-T, FAB-T, Square; L-inf, eps 4/255 on [0, 1] pixels as for
  ImageNet) from `torchattacks`, on the model with its input normalisation folded in.
- The corruption functions are the benchmark's own (`imagecorruptions`, the maintained fork); the rendition shift of
  the embedded data draws each digit as its outline.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from tlvit.data.shifts import CORRUPTIONS, SEVERITIES, corrupt, outline  # noqa: F401  (the builders, re-exported)

# AlexNet's top-1 error per corruption, mean over severities 1-5 (Hendrycks & Dietterich's published constants);
# the keys are `imagecorruptions`' names, in the benchmark's order.
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
AUTOATTACK_EPS = 4 / 255


def corruption_error(errors: dict[str, dict[int, float]], reference: dict[str, float] | None = ALEXNET_ERR) -> dict:
    """errors[corruption][severity] = top-1 error (%) -> {"mce" or "mean_error": %, "per_corruption": {c: %}}.

    With `reference` (AlexNet's mean errors as fractions): CE_c = sum_s E_c,s / sum_s E^ref_c,s, mCE = mean_c CE_c,
    in %. Without: the mean error over corruptions and severities. Every corruption needs all 5 severities.
    """
    missing = [c for c in CORRUPTIONS if sorted(errors.get(c, {})) != list(SEVERITIES)]
    if missing:
        raise ValueError(f"corruption errors missing for {missing}: each needs severities {list(SEVERITIES)}")
    per = {}
    for c in CORRUPTIONS:
        mean_err = statistics.fmean(errors[c][s] for s in SEVERITIES)  # %
        per[c] = 100.0 * (mean_err / 100.0) / reference[c] if reference else mean_err
    key = "mce" if reference else "mean_error"
    return {key: statistics.fmean(per.values()), "per_corruption": per}


def class_index(split_classes: list[str], train_classes: list[str]) -> list[int]:
    """The model's output index of each class folder of a test set: ImageNet-V2 names its folders by index
    ("0".."999"), ImageNet-A/-R/-C by WordNet id (then the id's position among the train split's folders)."""
    if all(c.isdigit() for c in split_classes):
        idx = [int(c) for c in split_classes]
        bad = [i for i in idx if i >= len(train_classes)]
        if bad:
            raise ValueError(f"class folders {bad[:5]} are beyond the model's {len(train_classes)} classes")
        return idx
    position = {c: i for i, c in enumerate(train_classes)}
    unknown = [c for c in split_classes if c not in position]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} are not classes of the train split (e.g. {train_classes[:2]}); "
                         "is this set for the same dataset?")
    return [position[c] for c in split_classes]


def predict(logits: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
    """Arg-max of `logits` [N, C]; with `classes`, over those output indices only (ImageNet-A/-R's 200 classes)."""
    if classes is not None and len(classes) < logits.shape[1]:
        masked = torch.full_like(logits, float("-inf"))
        idx = torch.as_tensor(classes)
        masked[:, idx] = logits[:, idx]
        logits = masked
    return logits.argmax(1)


@torch.no_grad()
def top1(logits: torch.Tensor, targets: torch.Tensor, classes: list[int] | None = None) -> float:
    """Top-1 (%) of `logits` [N, C] against `targets` (model indices), the arg-max over `classes` when given."""
    return 100.0 * int((predict(logits, classes) == targets).sum()) / len(targets)


class Normalised(torch.nn.Module):
    """A classifier on [0, 1] pixels: the model with its input normalisation folded in (what attacks perturb)."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def autoattack_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        eps: float = AUTOATTACK_EPS, seed: int = 0, batch_size: int = 64) -> dict:
    """Accuracy (%) of `model` (on [0, 1] pixels, e.g. `Normalised`) on `images` before and after the standard
    AutoAttack (L-inf, `eps`); every adversarial image stays within eps of its original and in [0, 1]."""
    import torchattacks

    model = model.eval()
    n_classes = int(model(images[:1]).shape[1])
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    clean = robust = 0
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        with torch.no_grad():
            clean += int((model(x).argmax(1) == y).sum())
        adv = attack(x, y)
        if (adv - x).abs().max() > eps + 1e-6 or adv.min() < 0 or adv.max() > 1:
            raise RuntimeError("AutoAttack returned images outside the L-inf ball or [0, 1]")
        with torch.no_grad():
            robust += int((model(adv).argmax(1) == y).sum())
    n = len(images)
    return {"images": n, "clean_top1": 100.0 * clean / n, "autoattack_top1": 100.0 * robust / n, "eps": eps}


# ---------------------------------------------------------------------------- measuring one checkpoint
def _rule(model) -> str:
    """The paper's inference rule: LV-ViT's cls + 0.5 max(aux) where the model has the aux head, else the class token."""
    return "cls_plus_aux" if getattr(model, "aux_head", None) is not None else "cls"


class RuleLogits(torch.nn.Module):
    """The model's logits under its inference rule (what an attack differentiates and a test set scores)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.rule = model, _rule(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tlvit.engine import inference_logits

        return inference_logits(self.model, x, (self.rule,))[self.rule]


@torch.no_grad()
def folder_top1(setup, root, split: str, train_classes: list[str], *, batch_size: int = 256) -> float:
    """Top-1 (%) of an EvalSetup (`tlvit.evaluate`) on `<root>/<split>/<class>/*` under the model's inference rule,
    its class folders mapped to the model's outputs (`class_index`; a subset of classes scores among those)."""
    from torch.utils.data import DataLoader

    from tlvit.data.datasets import DenseLabelDataset, EvalGeometry

    ds = DenseLabelDataset(root, split, EvalGeometry(setup.img_size, setup.crop_pct), setup.mean, setup.std)
    index = torch.as_tensor(class_index(ds.classes, train_classes))
    net = RuleLogits(setup.model.eval())
    correct, classes = 0, index.tolist()
    for batch in DataLoader(ds, batch_size=batch_size):
        correct += int((predict(net(batch["image"]), classes) == index[batch["label"]]).sum())
    return 100.0 * correct / len(ds)


def autoattack_subset(setup, root, split: str, n: int):
    """`n` images of a split, evenly spaced over its class-sorted order (every class represented), as [0, 1]
    pixels after the model's eval resize and crop, with their labels."""
    from tlvit.data.datasets import DenseLabelDataset, EvalGeometry

    ds = DenseLabelDataset(root, split, EvalGeometry(setup.img_size, setup.crop_pct), setup.mean, setup.std)
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
    items = [ds[int(i)] for i in idx]
    mean = torch.tensor(setup.mean).view(-1, 1, 1)
    std = torch.tensor(setup.std).view(-1, 1, 1)
    x = torch.stack([it["image"] for it in items]) * std + mean
    return x.clamp(0, 1), torch.tensor([it["label"] for it in items])


def measure(setup, sets: dict, train_classes: list[str], *, normalise_by_alexnet: bool, autoattack_images: int,
            seed: int = 0, batch_size: int = 256) -> dict:
    """Table 6's columns for one checkpoint. `sets` maps v2 / a / r / c / val to (root, split) or None (not present);
    c's split holds `<corruption>/<severity>/<class>/*`. Absent sets give no number (their key is left out)."""
    out: dict = {"inference_rule": _rule(setup.model)}
    for key in ("val", "v2", "a", "r"):
        if sets.get(key):
            out[key] = folder_top1(setup, *sets[key], train_classes, batch_size=batch_size)
    if sets.get("c"):
        root, split = sets["c"]
        errors = {c: {s: 100.0 - folder_top1(setup, root, f"{split}/{c}/{s}", train_classes, batch_size=batch_size)
                      for s in SEVERITIES} for c in CORRUPTIONS}
        ce = corruption_error(errors, ALEXNET_ERR if normalise_by_alexnet else None)
        out["c_kind"] = "mce" if normalise_by_alexnet else "mean_error"
        out["c"], out["c_per_corruption"] = ce[out["c_kind"]], ce["per_corruption"]
    if sets.get("val") and autoattack_images:
        x, y = autoattack_subset(setup, *sets["val"], autoattack_images)
        attacked = Normalised(RuleLogits(setup.model.eval()), setup.mean, setup.std)
        aa = autoattack_accuracy(attacked, x, y, seed=seed)
        out.update(autoattack=aa["autoattack_top1"], autoattack_clean=aa["clean_top1"], autoattack_images=aa["images"])
    return out


# ---------------------------------------------------------------------------- the stage: the table's rows
SET_SPLITS = {"val": "val", "v2": "val_v2", "a": "val_a", "r": "val_r", "c": "val_c"}  # embedded: split folders


def find_sets(data: dict, section: dict) -> dict:
    """set -> (root, split) or None: the embedded analogues from the data stage's folders, or the directories the
    preset's `robustness.sets` names (ImageNet-V2/-A/-C/-R); a missing one is None ("not present")."""
    root = Path(data["root"])
    if data["kind"] == "canvases":
        return {key: ((root, split) if (root / split).is_dir() else None) for key, split in SET_SPLITS.items()}
    dirs = section.get("sets") or {}
    out = {"val": (root, "val")}
    for key in ("v2", "a", "c", "r"):
        d = Path(dirs[key]) if dirs.get(key) else None
        out[key] = (d.parent, d.name) if d is not None and d.is_dir() else None
    return out


def measure_rows(layout, trained: list[str], table: dict, section: dict, params_path: str = "params.yaml") -> list[dict]:
    """Every seed's checkpoint of the rows to measure: the table's rows the preset trains (`rows: table6`) or every
    trained row (`rows: all`), each finished row's seeds in its metrics file."""
    import json

    from tlvit.config import ConfigError
    from tlvit.data.datasets import index_split
    from tlvit.evaluate import load_for_eval

    which = section.get("rows", "table6")
    if which not in ("table6", "all"):
        raise ConfigError(f"{params_path}: robustness.rows must be `table6` or `all`, not {which!r}")
    wanted = trained if which == "all" else [r["row"] for r in table["rows"] if r["row"] in trained]
    data = layout.dataset()
    sets = find_sets(data, section)
    train_classes = index_split(data["root"], "train")[2]
    out = []
    for row in wanted:
        path = layout.row_metrics(row)
        if not path.is_file():
            continue
        seeds = []
        for run in json.loads(path.read_text())["runs"]:
            ckpt = layout.run_dir(row, run["seed"]) / "checkpoint.pt"
            setup = load_for_eval(ckpt, len(train_classes), data_kind=data["kind"])
            seeds.append({"seed": run["seed"], **measure(
                setup, sets, train_classes, normalise_by_alexnet=data["kind"] != "canvases",
                autoattack_images=int(section.get("autoattack_images", 0)), seed=run["seed"],
                batch_size=int(section.get("batch_size", 256)))})
        out.append({"row": row, "seeds": seeds, "sets": {k: v is not None for k, v in sets.items()}})
    return out
