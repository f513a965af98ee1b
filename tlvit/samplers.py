"""Which samples each process sees in an epoch: a function of (seed, epoch, rank) only (DeiT's samplers.py)."""
from __future__ import annotations

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler, Sampler

from tlvit.data.datasets import hash_seed
from tlvit.distributed import DistEnv


class RepeatedAugSampler(RepeatAugSampler):
    """DeiT's repeated augmentation (timm's copy of DeiT's RASampler): each sampled image `repeats` times.

    timm lays the copies out next to each other and deals global positions out to the ranks round-robin,
    so the copies of an image land on different ranks (or in one batch with a single process), and an
    epoch keeps about len(dataset) samples: ~1/repeats of the images, each `repeats` times.
    Two additions keep our determinism: the shuffle is seeded by (seed, epoch), not the epoch alone, and
    each index comes with its copy number, (i, view), because `DenseLabelDataset` seeds augmentation
    per sample: without the view every copy would get the same crop, i.e. plain duplicates.
    """

    ORDER_STREAM = 1 << 40  # a hash_seed part no sample index or rank reaches: the order has a stream of its own

    def __init__(self, dataset, env: DistEnv, seed: int, repeats: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, num_repeats=repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(hash_seed(self.seed, epoch, self.ORDER_STREAM))

    def __iter__(self):
        # this rank's global positions, as timm deals them; position q holds copy q % repeats of its image
        positions = range(self.rank, self.total_size, self.num_replicas)[:self.num_selected_samples]
        return iter([(i, q % self.num_repeats) for q, i in zip(positions, super().__iter__())])


def train_sampler(dataset, cfg: dict, env: DistEnv, seed: int) -> Sampler:
    """This rank's share of an epoch, a function of (seed, epoch, rank): plain, or repeated augmentation."""
    repeats = cfg.get("repeated_aug", 0)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"row {cfg.get('row')!r}: repeated_aug must be 0 (off) or the number of copies (DeiT: 3), "
                         f"not {repeats!r}")
    if repeats > 1:
        return RepeatedAugSampler(dataset, env, seed, repeats)
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)


class ShardSampler(Sampler):
    """Evaluation shard of a process: every world-th sample, no padding (counts are summed later)."""

    def __init__(self, n: int, env: DistEnv):
        self.idx = list(range(env.rank, n, env.world_size))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
