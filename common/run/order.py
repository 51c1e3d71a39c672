"""The order in which training examples are seen, the same on both backends: each epoch a fresh shuffle
seeded by training.seed + epoch. It depends only on the epoch, so a resumed run sees what an uninterrupted
one would, and the same config on the same data trains on the same batches on either machine."""

from __future__ import annotations

import random


def epoch_order(examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(examples))
    random.Random(seed + epoch).shuffle(order)
    return order


class EpochOrder:
    """A sampler (any iterable with a length serves PyTorch's DataLoader) that yields `epoch_order`
    for the epoch the trainer sets."""

    def __init__(self, examples: int, seed: int):
        self.examples, self.seed, self.epoch = examples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.examples, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.examples
