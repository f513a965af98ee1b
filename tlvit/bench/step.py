"""Item 1: training-step cost of each supervision relative to its baseline (same model, same batch).

A step is what `tlvit.engine.train_one_epoch` does per batch: targets built on the device (score-map
scatter + resampling), mixing, `forward_train`, loss, backward, AdamW, scheduler and EMA. It is
timed by calling `train_one_epoch` itself on batches held in memory, with the model, supervision,
optimizer, scheduler, EMA and AMP built by `tlvit.train.build_training_state`, the function
`tlvit.train.train` builds them with, so a speed regression in the engine, the supervision, the
mixing or the model shows up here.
The data loader is left out (`tlvit bench data` measures it); batches are synthetic, with the
shapes and dtypes the loader produces (random-resized-crop thetas, fp16 top-k score maps).

Targets (LV-ViT claims token labeling is nearly free; TL-Align reports 322 -> 311 img/s, 1.035x):
token labeling <= 1.05x the class-token baseline step; TL-Align <= 1.01x the CutMix step. An A/A
row (the baseline against an identical second copy) shows how far noise alone moves a ratio.
On a CPU the ratios are judged on CPU time with one torch thread (see `tlvit.bench.common`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

from tlvit.bench.common import SOURCE_ROOT, Bench, Stopwatch, Target, column, interleave, markdown_table, paired_ratios, summary
from tlvit.labels.geometry import crop_flip_theta, identity_clips
from tlvit.labels.score_maps import class_dtype

# Output stride of each annotator's score map: the map covers the annotator's whole input.
ANNOTATOR_STRIDE = {"annotator_cnn": 4, "dm_nfnet_f6": 32}  # 64 px -> 16x16; 576 px -> 18x18 (LV-ViT Sec. 4.2)
NUM_CLASSES = {"canvases": 10, "imagefolder": 1000}


@dataclass(frozen=True)
class Variant:
    """A training row (experiments/rows.yaml) with optional extra overrides, timed against `reference`."""

    key: str
    label: str
    row: str
    overrides: tuple[tuple[str, object], ...] = ()
    reference: str | None = None  # key of the variant this one is divided by
    target: float | None = None  # step-time ratio to the reference must be <= this
    explicit_attention: bool = False  # diagnostic: softmax(QK^T) path instead of fused SDPA, as TL-Align needs


VARIANTS = (
    Variant("lvvit_ce", "LV-ViT, class-token CE (baseline)", "lvvit_s_baseline"),
    # the baseline against a second, identical copy of itself: how far from 1 noise alone moves a ratio
    Variant("lvvit_ce_again", "LV-ViT, class-token CE again (A/A control)", "lvvit_s_baseline", (), "lvvit_ce"),
    Variant("lvvit_tl", "LV-ViT, token labeling", "lvvit_s_token_labeling", (("augment.mix_token", False),),
            "lvvit_ce", 1.05),
    Variant("lvvit_tl_mixtoken", "LV-ViT, token labeling + MixToken (the paper's recipe)", "lvvit_s_token_labeling",
            (), "lvvit_ce", 1.05),
    Variant("lvvit_mixtoken", "LV-ViT, CE + MixToken", "lvvit_s_baseline", (("augment.mix_token", True),), "lvvit_ce"),
    Variant("lvvit_relabel", "LV-ViT, ReLabel", "lvvit_s_relabel_mixtoken", (("augment.mix_token", False),), "lvvit_ce"),
    Variant("deit_ce", "DeiT, class-token CE (baseline)", "deit_s_vanilla"),
    Variant("deit_cutmix", "DeiT, CutMix", "deit_s_cutmix", (), "deit_ce"),
    Variant("deit_tlalign", "DeiT, TL-Align (patch CutMix)", "deit_s_tlalign", (), "deit_cutmix", 1.01),
    # diagnostic: the part of TL-Align's cost that is reading the attention map (no fused SDPA), without alignment
    Variant("deit_cutmix_explicit", "DeiT, CutMix, explicit attention (diagnostic)", "deit_s_cutmix", (), "deit_cutmix",
            explicit_attention=True),
    Variant("deit_transmix", "DeiT, TransMix (CutMix)", "deit_s_transmix", (), "deit_cutmix"),
    # diagnostic: what smoothing every label slot (the original's, the default) costs against the class slot only
    Variant("deit_tlalign_cls_slot", "DeiT, TL-Align, class slot smoothed only (diagnostic)", "deit_s_tlalign_smooth_cls_slot",
            (), "deit_tlalign"),
)


def default_paths() -> tuple[Path, Path]:
    """params.yaml and experiments/rows.yaml of the working directory, else of the source checkout."""
    here = Path("params.yaml"), Path("experiments/rows.yaml")
    return here if all(p.is_file() for p in here) else (SOURCE_ROOT / "params.yaml", SOURCE_ROOT / "experiments/rows.yaml")


def variant_config(variant: Variant, preset: str, params_path: Path, rows_path: Path) -> dict:
    """The row's resolved training config under `preset`, plus the variant's overrides."""
    from tlvit.config import load_params, resolve_run_config, set_dotted

    cfg = resolve_run_config(load_params(params_path), variant.row, preset=preset, rows_path=rows_path,
                             params_path=params_path)
    for key, value in variant.overrides:
        set_dotted(cfg, key, value, where=f"bench variant {variant.key}")
    return cfg


def sync_fn(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


class StepRunner:
    """A row's training state, built by `tlvit.train.build_training_state` as train() builds it, stepped by
    `train_one_epoch` on in-memory batches."""

    def __init__(self, cfg: dict, num_classes: int, batch_size: int, device: torch.device, *,
                 explicit_attention: bool = False, seed: int = 0):
        from tlvit.train import build_training_state

        self.device = device
        # steps_per_epoch only places the lr on its schedule; the timed work does not depend on it
        self.state = build_training_state(cfg, num_classes, device, global_batch=batch_size, steps_per_epoch=1000,
                                          seed=seed)
        if explicit_attention:
            for m in self.state.model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        self.amp_dtype, self.channels_last = self.state.amp_dtype, self.state.channels_last
        self.generator = torch.Generator().manual_seed(seed)

    def step_seconds(self, batches: list[dict]) -> dict[str, float]:
        """Run `train_one_epoch` over `batches`; {"wall", "cpu"} seconds per step."""
        from tlvit.engine import train_one_epoch

        s = self.state
        with Stopwatch(sync_fn(self.device)) as sw:
            train_one_epoch(s.net, s.model, batches, s.supervision, s.optimizer, s.scheduler, 0, self.device,
                            generator=self.generator, show_progress=False, **s.step_kwargs())
        return {"wall": sw.seconds / len(batches), "cpu": sw.cpu_seconds / len(batches)}


def synthetic_batches(n: int, batch_size: int, img_size: int, num_classes: int, map_grid: tuple[int, int], k: int, *,
                      crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip: float = 0.5, seed: int = 0,
                      pin_memory: bool = False) -> list[dict]:
    """`n` collated batches as `DenseLabelDataset` + DataLoader produce them (CPU tensors, same dtypes).

    theta: a random resized crop (and flip) of a source image twice the crop size; topk: fp16 logits
    and k distinct class ids per score-map location, in the store's class dtype.
    """
    g = torch.Generator().manual_seed(seed)
    torch_cls = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}
    cls_dtype = torch_cls[class_dtype(num_classes)]
    src = torch.empty(1, 2 * img_size, 2 * img_size)
    batches = []
    for b in range(n):
        torch.manual_seed(seed + b)  # RandomResizedCrop.get_params draws from the global generator
        thetas = []
        for _ in range(batch_size):
            box = RandomResizedCrop.get_params(src, list(crop_scale), list(crop_ratio))
            thetas.append(crop_flip_theta(box, src.shape[1:], bool(torch.rand(()) < hflip)))
        h, w = map_grid
        classes = torch.rand(batch_size, num_classes, h, w, generator=g).topk(k, dim=1).indices
        batch = {
            "image": torch.randn(batch_size, 3, img_size, img_size, generator=g),
            "label": torch.randint(num_classes, (batch_size,), generator=g),
            "index": torch.arange(b * batch_size, (b + 1) * batch_size),
            "theta": torch.stack(thetas).float(),
            "clips": identity_clips(1).float().expand(batch_size, 1, 2, 3).contiguous(),
            "topk_logits": (torch.randn(batch_size, k, h, w, generator=g) * 3).sort(1, descending=True).values.half(),
            "topk_classes": classes.to(cls_dtype),
        }
        batches.append({key: v.pin_memory() if pin_memory and v.is_floating_point() else v for key, v in batch.items()})
    return batches


def map_grid_for(preset_sections: dict) -> tuple[tuple[int, int], int]:
    """(score-map grid, top-k) the preset's annotator and scoremaps stage produce."""
    ann = preset_sections["annotator"]
    side = ann["input_size"] // ANNOTATOR_STRIDE.get(ann["model"], 16)
    return (side, side), int(preset_sections["scoremaps"]["topk"])


def run(out_dir: str | Path, *, quick: bool = False, preset: str | None = None, device: str | None = None,
        batch_size: int | None = None, rounds: int | None = None, steps: int | None = None, warmup: int | None = None,
        threads: int | None = None, variants: tuple[Variant, ...] = VARIANTS, name: str = "step",
        paths: tuple[Path, Path] | None = None) -> dict:
    """Time every variant's step in interleaved rounds; ratios to the references are medians over rounds.

    threads: torch CPU threads while timing (default 1 on a CPU: the ratio of the work, which the
    load of other jobs cannot inflate through a straggling thread; see tlvit.bench.common).
    """
    from tlvit.config import load_params, preset_section

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = preset or ("imagenet" if dev.type == "cuda" else "embedded")
    params_path, rows_path = paths or default_paths()
    sections = preset_section(load_params(params_path), preset, params_path)
    cfgs = {v.key: variant_config(v, preset, params_path, rows_path) for v in variants}
    base = next(iter(cfgs.values()))
    num_classes = NUM_CLASSES[sections["data"]["kind"]]
    if batch_size is None:  # the preset's per-process batch; a GPU benchmark uses one GPU's share of ImageNet's 1024
        batch_size = 8 if quick else (128 if dev.type == "cuda" else base["batch_size"])
    rounds = rounds or (1 if quick else (10 if dev.type == "cuda" else 15))
    steps = steps or (1 if quick else (5 if dev.type == "cuda" else 2))
    warmup = (0 if quick else 2) if warmup is None else warmup
    threads = threads or (torch.get_num_threads() if dev.type == "cuda" else 1)
    clock = "wall" if dev.type == "cuda" else "cpu"  # the clock the targets are judged on
    grid, k = map_grid_for(sections)
    bench = Bench(name, out_dir, quick=quick, device=str(dev))

    batches = synthetic_batches(steps, batch_size, base["img_size"], num_classes, grid, k,
                                crop_scale=tuple(base["crop_scale"]), crop_ratio=tuple(base["crop_ratio"]),
                                hflip=base["hflip"], pin_memory=dev.type == "cuda")
    runners = {v.key: StepRunner(cfgs[v.key], num_classes, batch_size, dev, explicit_attention=v.explicit_attention)
               for v in variants}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples = interleave({key: (lambda r=r: r.step_seconds(batches)) for key, r in runners.items()}, rounds, warmup)
    finally:
        torch.set_num_threads(threads_before)
    bench.sample_load()

    results, rows, targets = {}, [], []
    for v in variants:
        wall, cpu = column(samples[v.key], "wall"), column(samples[v.key], "cpu")
        judged = summary(wall if clock == "wall" else cpu, 5)
        entry = {"label": v.label, "row": v.row, "overrides": dict(v.overrides), "model": cfgs[v.key]["model"],
                 "explicit_attention": v.explicit_attention,
                 "step_wall_s": summary(wall, 5), "step_cpu_s": summary(cpu, 5),
                 "images_per_s": round(batch_size / judged["median"], 1), "reference": v.reference}
        ratio = other = None
        if v.reference:
            ref = samples[v.reference]
            entry["ratio_wall"] = summary(paired_ratios(wall, column(ref, "wall")))
            entry["ratio_cpu"] = summary(paired_ratios(cpu, column(ref, "cpu")))
            ratio, other = entry[f"ratio_{clock}"], entry["ratio_cpu" if clock == "wall" else "ratio_wall"]
            if v.target is not None:
                targets.append(Target(f"step: {v.label} / {label_of(variants, v.reference)}", ratio["median"], "<=", v.target))
        results[v.key] = entry
        rows.append((v.label, entry["model"], f"{entry['step_wall_s']['median'] * 1000:.0f}",
                     f"{entry['step_cpu_s']['median'] * 1000:.0f}", f"{entry['images_per_s']:.0f}",
                     f"{ratio['median']:.3f} [{ratio['q25']:.3f}–{ratio['q75']:.3f}]" if ratio else "1 (reference)",
                     f"{other['median']:.3f}" if other else "",
                     label_of(variants, v.reference) if v.reference else "",
                     f"≤ {v.target}" if v.target is not None else ""))
    other_clock = "cpu" if clock == "wall" else "wall"
    table = markdown_table(("variant", "model", "wall ms/step", "CPU ms/step", f"img/s ({clock})",
                            f"ratio, {clock} (median [q25–q75])", f"ratio, {other_clock}", "relative to", "target"), rows)
    one = runners[variants[0].key]
    settings = {"preset": preset, "device": str(dev), "batch_size": batch_size, "rounds": rounds, "steps_per_call": steps,
                "warmup_rounds": warmup, "threads": threads, "clock_for_targets": clock, "num_classes": num_classes,
                "img_size": base["img_size"], "score_map_grid": list(grid), "topk": k,
                "amp_dtype": str(one.amp_dtype).replace("torch.", "") if one.amp_dtype else None,
                "channels_last": one.channels_last, "ema": {v.key: bool(cfgs[v.key].get("ema_decay")) for v in variants},
                "timed": "tlvit.engine.train_one_epoch on in-memory batches (loader excluded)"}
    notes = [f"targets judged on {clock} time" + (f" with {threads} torch thread(s)" if clock == "cpu" else "")]
    return bench.finish(settings=settings, results=results, targets=targets, tables=[table], notes=notes)


def label_of(variants: tuple[Variant, ...], key: str) -> str:
    """The label of the variant with `key`."""
    return next(v.label for v in variants if v.key == key)
