"""Data-parallel training under torchrun: setup, teardown and the reductions the loop needs.

With one process every helper reduces to plain arithmetic, so the loop reads the same either way.
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from . import fsdp, lost_rank
from .cli import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    heartbeat: lost_rank.Heartbeat | None = None  # under torchrun: this rank's, stopped by teardown_distributed

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    def log(self, *values) -> None:
        if self.is_main:
            print(*values)


def setup_distributed(timeout_s: float = 300) -> Distributed:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU), or run as a single process. A collective
    that waits more than `timeout_s` for another rank fails (support/lost_rank.py says which rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Distributed(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), world_size, device, lost_rank.Heartbeat(dist.get_rank()))


def data_parallel(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel under torchrun, the model itself otherwise. Drop every reference to
    the wrapper before `teardown_distributed`."""
    return DistributedDataParallel(model) if dist.is_initialized() else model


TEARDOWN_DEADLINE_S = 60  # leaving the process group takes well under a second; past this it is stuck


def teardown_distributed(env: Distributed, finished: bool) -> None:
    """Leave the process group in an order that cannot deadlock; `finished`: the run's work ended normally.

    A DDP wrapper's Reducer holds the process group. Were the Reducer the last to hold it, freeing the
    wrapper after destroy_process_group would destroy the group inside the Reducer's destructor, which runs
    holding the GIL and joins gloo's worker threads, while a worker may be waiting for the GIL to free a
    finished collective's tensors: a deadlock (py-spy: ~ProcessGroupGloo under ~Reducer, at random). So the
    caller drops its wrapper first; here the frames of an exception in flight, which may hold it too, are
    cleared and collected; the ranks meet (after a normal end only: a failed rank may have left the others
    inside a collective); then the group is destroyed, and it is freed by its own binding, without the GIL.
    Should anything still hang, a watchdog thread outside Python prints every thread's stack and ends the
    process after TEARDOWN_DEADLINE_S.
    """
    if env.heartbeat is not None:
        env.heartbeat.stop()
    if not dist.is_initialized():
        return
    in_flight = sys.exc_info()[1]
    if in_flight is not None:
        traceback.clear_frames(in_flight.__traceback__)
    gc.collect()
    if finished:
        dist.barrier()
    faulthandler.dump_traceback_later(TEARDOWN_DEADLINE_S, exit=True)
    try:
        dist.destroy_process_group()
        gc.collect()
    finally:
        faulthandler.cancel_dump_traceback_later()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all processes (in float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_, and under FSDP the same to the last bit: returns the norm before.

    torch's own, given FSDP's gradient shards, takes a norm of each shard, then of those, and so clips
    N ranks by another last bit than one process (AdamW turns that into visible differences where
    gradients are near 0). Here each rank gathers the whole gradients (A and B's: small), takes their
    norm as torch does, and scales its own shards by the factor torch would use.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(grad, DTensor) for grad in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    norm = torch.nn.utils.get_total_norm([fsdp.full(grad) for grad in grads])  # a collective: every rank
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
    for grad in grads:
        fsdp.local(grad).mul_(scale)
    return norm.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any process (so that all of them stop at the same step)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on every process (under FSDP each checks its own shards)."""
    return not any_rank(not flag, device)


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


def check_started_alike(values: dict) -> None:
    """Every process of the job was started alike: its `values` (settings, data fingerprint, code version)
    equal rank 0's. Each process reads its own command line and files, so two nodes given different ones would
    each train with their own, and training_config.json would record rank 0's alone. Every rank sees every
    rank's values and refuses alike, naming the first difference (rank 0 says it)."""
    everyone = gather_to_main(values)
    for rank, other in enumerate(everyone):
        differing = sorted(key for key in everyone[0].keys() | other.keys() if other.get(key) != everyone[0].get(key))
        if differing:
            key = differing[0]
            raise UsageError(
                f"rank {rank} was started with {key}={other.get(key)!r}, rank 0 with {everyone[0].get(key)!r}: every "
                "process of a torchrun job must run the same code with the same arguments and data; start them alike."
            )


def code_version() -> str:
    """A fingerprint of this project's Python source as this process sees it (SHA-256 of every file)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *root.glob("*/*.py")]):
        if path.parent.name not in ("tests", "docs"):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def gather_to_main(value: T) -> list[T]:
    """Every rank's `value`, in rank order (what rank 0 needs to checkpoint all RNG states)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
