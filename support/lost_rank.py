"""A rank that stops answering ends the others with one sentence that names it, not a hang or a traceback.

Each process of a torchrun job bumps a counter of its own in the job's store (the rendezvous' TCPStore,
which torchrun's agent hosts) once a second. A collective whose peer died fails on the survivors (at once
when the peer's connections close; after --dist-timeout when a whole node is gone): the survivors then
look at the counters for a few seconds, and the ranks whose counter stood still are the lost ones.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

HEARTBEAT_S = 1.0
KEY = "lora_t5/heartbeat/{}"
# What gloo and NCCL say when a peer is gone or a collective waited past its timeout.
LOST_PEER_SIGNS = ("connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe", "nccl")


class LostRankError(RuntimeError):
    """Another process of the job stopped answering."""


class Heartbeat:
    """The counter of this rank, bumped every HEARTBEAT_S seconds by a thread until stop()."""

    def __init__(self, rank: int) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.key, self.stopped = KEY.format(rank), threading.Event()
        self.thread = threading.Thread(target=self.beat, name="heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.add(self.key, 1)
            except Exception:  # the store's host is gone: naming the lost rank will say so
                return
            self.stopped.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2 * HEARTBEAT_S)


def silent_ranks(store, world_size: int, watch_s: float = 3 * HEARTBEAT_S) -> list[int] | None:
    """The ranks whose heartbeat did not move in `watch_s` seconds; None if the store itself is gone."""
    try:
        before = [store.add(KEY.format(rank), 0) for rank in range(world_size)]
        time.sleep(watch_s)
        after = [store.add(KEY.format(rank), 0) for rank in range(world_size)]
    except Exception:
        return None
    return [rank for rank in range(world_size) if after[rank] == before[rank]]


def is_lost_peer(err: BaseException) -> bool:
    return dist.is_initialized() and (
        isinstance(err, dist.DistError) or any(sign in str(err).lower() for sign in LOST_PEER_SIGNS)
    )


@contextmanager
def naming_a_lost_rank(last_checkpoint: Callable[[], Path | None], timeout_s: float):
    """Turn a collective that failed for want of a peer into a LostRankError naming the rank and the last
    checkpoint. SIGTERM is ignored from then on: torchrun sends it to the survivors as soon as it sees a
    worker die, and the sentence must still be said (torchrun ends the process 30 s later in any case)."""
    try:
        yield
    except RuntimeError as err:
        if not is_lost_peer(err):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = dist.get_rank()
        silent = silent_ranks(dist.distributed_c10d._get_default_store(), dist.get_world_size())
        if silent is None:
            who = "the job's store (hosted by torchrun on the first node) stopped answering, so its node is lost"
        elif others := [r for r in silent if r != rank]:  # this rank's own heartbeat may have ended with its store
            who = f"rank {', '.join(map(str, others))} stopped answering"
        else:
            who = f"a collective waited past --dist-timeout ({timeout_s:.0f} s) for the other ranks"
        checkpoint = last_checkpoint()
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else "")
        reason = reason.split(". ")[0][:160] or type(err).__name__  # gloo: "[pair.cc:553] Connection closed ..."
        raise LostRankError(
            f"rank {rank}: {who} ({reason}); {where}: once every process is back, continue with --resume."
        ) from None


@contextmanager
def sigterm_ignored():
    """Inside the block SIGTERM is ignored (restored on exit): while the ranks meet at the end of a run,
    torchrun's SIGTERM, sent to the survivors as soon as it sees a worker exit, would end this rank before its
    failed collective can name the lost one (torchrun's SIGKILL follows 30 s later in any case)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
