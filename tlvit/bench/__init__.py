"""`tlvit bench`: the harness's speed, measured side by side in one run (docs/benchmarks.md).

One module per benchmark, each with `run(...) -> dict` (the JSON record it also writes):
  step       training-step cost of each supervision / mixing relative to its baseline (same model, batch)
  data       training-loader images/s with score maps vs without
  scoremaps  score-map generation images/s and bytes per image in the store
  segmentation  segmentation fine-tune cost per backbone and head: s per iteration, per val image, per fine-tune
  detection  detection (Mask R-CNN) fine-tune cost per backbone: s per iteration, per val image, per fine-tune
  repro      wall time of `dvc repro` from a clean state, and of a no-op `dvc repro`
  gpu        harness vs a minimal plain PyTorch loop (bf16 AMP), model FLOP utilisation; skipped without a GPU
`common` holds what they share: interleaved timing, medians, targets (✓/✗), the table and the JSON record.
"""
