"""Markdown for the checkpoint table (`metrics/<preset>/{checkpoints,reeval}.json`, measured by
`tlvit.checkpoint_eval`). Apart from the measuring module, so the report renders it without importing the
training loop."""
from __future__ import annotations


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _delta(measured, paper) -> str:
    return "—" if measured is None or paper is None else f"{measured - paper:+.2f}"


def render_checkpoint_table(record: dict) -> str:
    """Markdown for `metrics/<preset>/checkpoints.json`."""
    rows, lines = record["rows"], []
    if record["source"] == "released":
        lines += ["## Released checkpoints: paper vs measured (LV-ViT Tables 8 and 10, TL-Align Table 1)", "",
                  (f"Each file in `{record['dir']}`" if record.get("dir") else
                   "No folder of released files is set (params `checkpoints.dir`), so every file is *not downloaded*; "
                   "each one present would be")
                  + f" evaluated on `{record.get('data')}` val with `tlvit eval` "
                  "(the model's `pretrained_cfg`: resize, crop, interpolation, mean/std as the authors evaluated; LV-ViT: "
                  "`cls + 0.5·max(aux)`). Params and GMACs are counted from the model as built (torch's FlopCounterMode, "
                  "one image); LV-ViT's built params include the token-labeling head, which the README's counts leave out.",
                  "", "| Checkpoint | Source | Paper top-1 | Measured top-1 | Δ | Paper ReaL | Measured ReaL | Δ | "
                  "Paper params (M) | Built params (M) | Paper GFLOPs | Measured GMACs | Status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for r in rows:
            flops = _num(r.get("paper_gflops"), 1) + (" (!)" if r.get("paper_inconsistent") == "gflops" else "")
            lines.append(f"| {r['id']} ({r['img_size']} px) | {r['source']} | {_num(r['paper_top1'], 1)} | "
                         f"{_num(r.get('top1'))} | {_delta(r.get('top1'), r['paper_top1'])} | "
                         f"{_num(r.get('paper_real_top1'), 1)} | {_num(r.get('real_top1'))} | "
                         f"{_delta(r.get('real_top1'), r.get('paper_real_top1'))} | {_num(r.get('paper_params_m'), 1)} | "
                         f"{_num(r['params_m'])} | {flops} | {_num(r['gmacs'])} | {r['status']} |")
            if r.get("paper_inconsistent") == "gflops":
                notes.append(f"- (!) {r['id']}: the paper's {r['paper_gflops']} GFLOPs contradicts its own figures and "
                             f"the architecture: {r['gmacs']} GMACs counted here on the network as released.")
        lines += ["", *notes] if notes else []
    else:
        lines += ["## The pipeline's own checkpoints, evaluated again (`tlvit eval`)", "",
                  "Each row's first seed: its checkpoint loaded and scored as `tlvit eval` does, next to the top-1 its "
                  "training logged for the same weights; Δ must be 0.00. Params and GMACs as built (one image).", "",
                  "| Row | Model | Seed | Trained top-1 | `tlvit eval` top-1 | Δ | cls-only (trained / eval) | "
                  "Params (M) | GMACs | Status |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cls = (f"{_num(r.get('trained_top1_cls'))} / {_num(r.get('top1_cls'))}" if r.get("top1_cls") is not None
                   else "—")
            lines.append(f"| {r['id']} | {r.get('model', '—')} | {r.get('seed', '—')} | {_num(r.get('trained_top1'))} | "
                         f"{_num(r.get('top1'))} | {_delta(r.get('top1'), r.get('trained_top1'))} | {cls} | "
                         f"{_num(r.get('params_m'))} | {_num(r.get('gmacs'), 3)} | {r['status']} |")
    return "\n".join(lines) + "\n"
