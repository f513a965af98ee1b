"""`tlvit scoremaps`: dense score maps for any ImageFolder with any timm annotator."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("scoremaps", help="generate a score-map store for an ImageFolder split",
                       description="Apply a timm classifier densely to every image of <data>/<split> and store "
                                   "the top-k logits per location (resumable: re-run the same command after a kill).")
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root: <data>/<split>/<class>/<image>")
    p.add_argument("--split", default="train")
    p.add_argument("--annotator", required=True, help="timm model name, e.g. dm_nfnet_f6 or annotator_cnn")
    p.add_argument("--checkpoint", default=None, help="local weights for the annotator (else timm's pretrained weights)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    p.add_argument("--input-size", type=int, default=None, help="square input size; default: the model's")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", required=True, type=Path, help="store directory (created)")
    p.add_argument("--shard", default="0/1", help="i/n: this process computes every n-th chunk from i "
                   "(run n processes, e.g. a Slurm array with --shard $SLURM_ARRAY_TASK_ID/n; the last one publishes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tlvit.data.datasets import DenseLabelDataset, WholeImageGeometry, index_split
    from tlvit.labels.annotator import build_annotator, file_sha256, generate_score_maps

    classes = index_split(args.data, args.split)[2]
    num_classes = args.num_classes or len(classes)
    model = build_annotator(args.annotator, num_classes, pretrained=args.checkpoint is None, checkpoint=args.checkpoint)
    cfg = model.pretrained_cfg
    size = args.input_size or cfg["input_size"][-1]
    if args.input_size is None:
        print(f"warning: no --input-size: using {args.annotator}'s default {size} px; the map's grid follows the input "
              "(LV-ViT's maps: dm_nfnet_f6 at --input-size 576, 18x18), and the pipeline's stage uses "
              "annotator.input_size", file=sys.stderr)
    ds = DenseLabelDataset(args.data, args.split, WholeImageGeometry(size), cfg["mean"], cfg["std"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"annotator": args.annotator, "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else "timm-pretrained",
            "input_size": size}
    shard, num_shards = (int(v) for v in args.shard.split("/"))
    store = generate_score_maps(model, ds, args.out, k=args.topk, batch_size=args.batch_size, meta=meta, device=device,
                                shard=shard, num_shards=num_shards)
    if store is None:
        print(f"{args.out}: shard {shard}/{num_shards} done; waiting for the other shards to finish the store")
        return 0
    print(f"{args.out}: {len(store)} images, grid {store.grid}, top-{store.index['k']}, "
          f"{store.bytes_per_image():.0f} bytes/image")
    return 0
