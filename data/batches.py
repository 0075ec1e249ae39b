"""Which rows each optimizer step trains on: an epoch's length-bucketed batches, and the one plan that maps a
step to its batches, so that where an epoch ends and which batch comes next are decided in one place."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class LengthBucketSampler:
    """An epoch's batches, of rows of similar length, in an order that depends only on (seed, epoch).

    Each epoch: shuffle all rows, cut them into buckets of `batch_size * bucket_batches` rows, sort each
    bucket by `lengths` (any sortable key per row, e.g. `bucket_key`), cut it into batches and shuffle the
    batches. Every row comes exactly once per epoch; the batches are those of all processes together
    (StepPlan hands them out).
    """

    def __init__(self, lengths: Sequence, batch_size: int, seed: int = 0, bucket_batches: int = 32) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not lengths:
            raise ValueError("there are no rows to batch.")
        self.lengths = list(lengths)
        self.batch_size, self.seed = batch_size, seed
        self.bucket_size = batch_size * bucket_batches
        self._cached: tuple[int, list[list[int]]] | None = None  # the last epoch asked for: a step asks per step

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)  # buckets hold whole batches: only the last is short

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, in order, as indices into the rows."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.bucket_size):
            bucket = sorted(order[start : start + self.bucket_size], key=lambda i: self.lengths[i])
            batches += [bucket[i : i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._cached = (epoch, batches)
        return batches


class StepPlan:
    """The batches of each optimizer step on this process: the one place that says where an epoch ends and
    which batch comes next, for a fresh run and a resumed one alike.

    Everything follows from the step's number. A step takes `batches_per_step` = processes x grad_accum of the
    epoch's batches, the epoch's last step what is left: step s (counted from 0 over the whole run) is step
    k = s % steps_per_epoch of epoch s // steps_per_epoch and trains on that epoch's batches
    k * batches_per_step, ..., (k + 1) * batches_per_step - 1. Rank r of them takes r, r + world_size, ...,
    and a rank short of one an empty batch ([]), so that all step together. So a step reads the same rows on
    any number of processes with the same processes x grad_accum, and a checkpoint needs nothing but its
    step count to continue the exact sequence of batches.
    """

    def __init__(self, sampler: LengthBucketSampler, grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        if grad_accum <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"grad_accum {grad_accum} and rank {rank} of {world_size} processes make no plan.")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.batches_per_step = world_size * grad_accum
        self.steps_per_epoch = math.ceil(sampler.batches_per_epoch / self.batches_per_step)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's batches (row indices) for step `step`, the number of steps done before it."""
        epoch, k = divmod(step, self.steps_per_epoch)
        first = k * self.batches_per_step
        batches = self.sampler.all_batches(epoch)[first : first + self.batches_per_step]
        own = batches[self.rank :: self.world_size]
        return own + [[]] * (math.ceil(len(batches) / self.world_size) - len(own))

    def position(self, steps: int) -> tuple[int, int]:
        """(epoch, batches of it done, counted over all processes) after `steps` steps."""
        epoch, k = divmod(steps, self.steps_per_epoch)
        return epoch, k * self.batches_per_step

    def epochs_done(self, steps: int) -> float:
        """Epochs trained after `steps` steps: 2.5 is half-way through the third."""
        epoch, batches = self.position(steps)
        return epoch + batches / self.sampler.batches_per_epoch

    def ends_epoch(self, steps: int) -> bool:
        """Whether the step that brought the count to `steps` was the last of its epoch."""
        return steps > 0 and steps % self.steps_per_epoch == 0
