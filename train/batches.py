"""The order the loop sees the data in: seeded epochs of global micro-batches, one stream across epochs.

Each epoch is a seeded permutation cut into global micro-batches of batch_size x world_size examples; the last
incomplete one is dropped, so every step sees exactly batch_size x grad_accum x world_size examples and
`loss / grad_accum` plus the gradient average over ranks is the exact mean. Rank r takes the r-th slice of each
global micro-batch. With lengths (a length_fn) the permutation is cut into mega-chunks of MEGA_BATCHES batches,
each sorted by length, and the batches are then shuffled (the idea of HF's LengthGroupedSampler): less padding,
the same examples. Micro-batches form one stream across epochs, so resuming needs only the step:
position = step x grad_accum.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

MEGA_BATCHES = 50   # batches per length-sorted chunk when grouping by length


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Index lists of `batch_size` for one epoch (the last incomplete one dropped); same on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        chunk = batch_size * MEGA_BATCHES
        order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class MicroBatches:
    """This rank's micro-batches as one stream across epochs: number m is batch m % per_epoch of epoch
    m // per_epoch, so the position to resume from is just step x grad_accum."""

    def __init__(self, data: Sequence, collate_fn: Callable, batch_size: int, *, rank: int, world: int,
                 seed: int, lengths: Sequence[int] | None):
        self.data, self.collate_fn, self.batch_size, self.rank = data, collate_fn, batch_size, rank
        self.global_batch, self.seed, self.lengths = batch_size * world, seed, lengths
        self.per_epoch = len(data) // self.global_batch
        self._epoch, self._order = -1, []

    def __getitem__(self, m: int):
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_batches(len(self.data), self.global_batch, seed=self.seed, epoch=epoch,
                                        lengths=self.lengths)
        mine = self._order[pos][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # rank's slice
        return self.collate_fn([self.data[i] for i in mine])


def example_lengths(train_data: Sequence, config, length_fn) -> list[int] | None:
    if config.group_by_length and length_fn is None:
        raise ValueError("group_by_length=True needs length_fn=... (e.g. lambda ex: len(ex['input_ids'])), "
                         "or set group_by_length=None/False")
    if length_fn is None or config.group_by_length is False:
        return None
    return [int(length_fn(example)) for example in train_data]
