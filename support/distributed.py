"""Data-parallel training under torchrun: setup, teardown and the reductions the loop needs.

With one process every helper reduces to plain arithmetic, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .cli import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    def log(self, *values) -> None:
        if self.is_main:
            print(*values)


def setup_distributed() -> Distributed:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Distributed(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), world_size, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all processes (in float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any process (so that all of them stop at the same step)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def on_main(fn: Callable[[], T], is_main: bool) -> T:
    """Run `fn` on rank 0 only and hand its result, or the UsageError it raised, to every rank."""
    verdict = [None, None]  # (result, refusal)
    if is_main:
        try:
            verdict[0] = fn()
        except UsageError as err:
            verdict[1] = str(err)
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise UsageError(verdict[1])
    return verdict[0]


def gather_to_main(value: T) -> list[T]:
    """Every rank's `value`, in rank order (what rank 0 needs to checkpoint all RNG states)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
