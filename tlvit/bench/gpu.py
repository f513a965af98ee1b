"""Item 5 (GPU): harness training throughput vs a minimal plain PyTorch loop, model FLOP utilisation.

For LV-ViT-S and DeiT-S (the imagenet preset's class-token baselines, bf16 autocast, channels-last
as the preset sets them) the harness step (`tlvit.engine.train_one_epoch`, see `tlvit.bench.step`)
and a minimal loop on the same timm model, batch and optimizer are timed in interleaved rounds:

    x, y = batch["image"].to(dev), batch["label"].to(dev)
    with autocast(bf16): loss = cross_entropy(model(x), y, label_smoothing)
    zero_grad(); loss.backward(); AdamW.step()

Target: harness images/s >= 0.95x the plain loop's. Then item 1's ratios are measured on the GPU at
full size (`tlvit.bench.step` with the imagenet preset, written as step_gpu.json).
FLOPs of one forward + backward come from `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions, attention); MFU = those FLOPs x steps/s / the GPU's dense bf16 peak.
Without a GPU the benchmark reports "no GPU: skipped" (device="cpu" runs it on the CPU, for tests).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tlvit.bench import step as step_bench
from tlvit.bench.common import Bench, Stopwatch, Target, column, interleave, markdown_table, paired_ratios, summary

TARGET = 0.95
MODELS = (("lvvit_s", "lvvit_s_baseline"), ("deit_s", "deit_s_vanilla"))  # (name, class-token baseline row)

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; matched by substring.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
             ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


class PlainLoop:
    """The minimal PyTorch loop on the same model (built as the harness builds it), batch and AdamW."""

    def __init__(self, cfg: dict, num_classes: int, batch_size: int, device: torch.device, *, amp_dtype, channels_last: bool,
                 seed: int = 0):
        from tlvit.models import build_model
        from tlvit.train import lr_for

        torch.manual_seed(seed)
        self.model = build_model(cfg, num_classes).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr_for(cfg, batch_size), weight_decay=cfg["weight_decay"])
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.smoothing = cfg["label_smoothing"]

    def loss(self, batch: dict) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)

    def step_seconds(self, batches: list[dict]) -> dict[str, float]:
        """{"wall", "cpu"} seconds per step over `batches`."""
        self.model.train()
        with Stopwatch(step_bench.sync_fn(self.device)) as sw:
            for batch in batches:
                loss = self.loss(batch)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        return {"wall": sw.seconds / len(batches), "cpu": sw.cpu_seconds / len(batches)}

    def flops_per_step(self, batch: dict) -> int:
        """FLOPs of one forward + backward (the optimizer's elementwise work is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.loss(batch).backward()
        self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def compare(cfg: dict, num_classes: int, batches: list[dict], device: torch.device, *, rounds: int, warmup: int,
            clock: str, peak: float | None) -> dict:
    """Harness step vs plain loop on one row's model, interleaved; FLOPs, images/s, TFLOP/s and MFU of each."""
    batch_size = len(batches[0]["label"])
    harness = step_bench.StepRunner(cfg, num_classes, batch_size, device)
    plain = PlainLoop(cfg, num_classes, batch_size, device, amp_dtype=harness.amp_dtype, channels_last=harness.channels_last)
    flops = plain.flops_per_step(batches[0])
    samples = interleave({"harness": lambda: harness.step_seconds(batches), "plain": lambda: plain.step_seconds(batches)},
                         rounds, warmup)
    samples = {which: column(s, clock) for which, s in samples.items()}
    entry = {"model": cfg["model"], "flops_per_step": flops,
             # plain seconds / harness seconds = harness images/s / plain images/s
             "ratio_harness_to_plain_img_s": summary(paired_ratios(samples["plain"], samples["harness"]))}
    for which in ("harness", "plain"):
        s = summary(samples[which], 5)
        entry[which] = {"step_s": s, "images_per_s": round(batch_size / s["median"], 1),
                        "achieved_tflops": round(flops / s["median"] / 1e12, 4),
                        "mfu": round(flops / s["median"] / peak, 4) if peak else None}
    return entry


def run(out_dir: str | Path, *, quick: bool = False, device: str | None = None, preset: str | None = None,
        batch_size: int | None = None, rounds: int | None = None, steps: int | None = None, with_step: bool = True,
        peak_tflops: float | None = None, models: tuple[tuple[str, str], ...] = MODELS,
        paths: tuple[Path, Path] | None = None) -> dict:
    """Harness vs plain loop per model (and item 1 on the GPU); skipped when there is no GPU."""
    from tlvit.config import load_params, preset_section
    from tlvit.train import amp_dtype_for

    if device is None and not torch.cuda.is_available():
        bench = Bench("gpu", out_dir, quick=quick)
        return bench.finish(settings={}, results={"reason": "no GPU"}, status="skipped", notes=["no GPU: skipped"])
    dev = torch.device(device or "cuda")
    preset = preset or ("imagenet" if dev.type == "cuda" else "smoke")
    params_path, rows_path = paths or step_bench.default_paths()
    sections = preset_section(load_params(params_path), preset, params_path)
    num_classes = step_bench.NUM_CLASSES[sections["data"]["kind"]]
    batch_size = batch_size or (8 if quick else 128)
    rounds = rounds or (1 if quick else 10)
    steps = steps or (1 if quick else 10)
    bench = Bench("gpu", out_dir, quick=quick, device=str(dev))
    clock = "wall" if dev.type == "cuda" else "cpu"  # see tlvit.bench.common
    peak = peak_tflops * 1e12 if peak_tflops else (peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None)

    results, rows, targets = {}, [], []
    grid, k = step_bench.map_grid_for(sections)
    for name, row in models:
        cfg = step_bench.variant_config(step_bench.Variant(name, name, row), preset, params_path, rows_path)
        batches = step_bench.synthetic_batches(steps, batch_size, cfg["img_size"], num_classes, grid, k,
                                               pin_memory=dev.type == "cuda")
        entry = compare(cfg, num_classes, batches, dev, rounds=rounds, warmup=0 if quick else 3, clock=clock, peak=peak)
        results[name] = {"row": row, **entry}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ratio, h = entry["ratio_harness_to_plain_img_s"], entry["harness"]
        rows.append((cfg["model"], f"{entry['plain']['images_per_s']:.0f}", f"{h['images_per_s']:.0f}",
                     f"{ratio['median']:.3f} [{ratio['q25']:.3f}–{ratio['q75']:.3f}]",
                     f"{entry['flops_per_step'] / batch_size / 1e9:.2f}", f"{h['achieved_tflops']:.3g}",
                     f"{h['mfu']:.1%}" if h["mfu"] is not None else "–",
                     f"{entry['plain']['mfu']:.1%}" if entry["plain"]["mfu"] is not None else "–"))
        targets.append(Target(f"gpu: {cfg['model']} harness / plain loop images/s", ratio["median"], ">=", TARGET))
        bench.sample_load()
    table = markdown_table(("model", "plain loop img/s", "harness img/s", "harness / plain (median [q25–q75])",
                            "GFLOP/img (fwd+bwd)", "harness TFLOP/s", "harness MFU", "plain MFU"), rows)
    step_record = None
    if with_step:
        step_record = step_bench.run(out_dir, quick=quick, preset=preset, device=str(dev), batch_size=batch_size,
                                     name="step_gpu", paths=paths)
        targets += [Target(f"gpu {t['name']}", t["value"], t["op"], t["threshold"], t["unit"]) for t in step_record["targets"]]
    settings = {"preset": preset, "batch_size": batch_size, "rounds": rounds, "steps_per_call": steps, "clock": clock,
                "amp_dtype": str(amp_dtype_for(cfg, dev)).replace("torch.", ""),
                "peak_flops": peak, "data": "synthetic batches in pinned CPU memory, copied to the GPU every step (both loops)"}
    if step_record is not None:
        results["step_gpu"] = {"json": str(Path(out_dir) / "step_gpu.json"), "all_targets_met": step_record["all_targets_met"]}
    notes = [] if peak or dev.type != "cuda" else ["unknown GPU peak: pass --peak-tflops for MFU"]
    if not with_step:
        notes.append("item 1's ratios on this device: step.json of the same `tlvit bench all` run")
    return bench.finish(settings=settings, results=results, targets=targets, tables=[table], notes=notes)
