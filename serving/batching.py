"""Requests gathered into one batch across adapters: one thread owns the model and generates batch after batch.

A request waits in a bounded queue. The thread takes the first one, gathers whatever else arrives within the
batch window, up to max_batch rows, and generates them at once, each row with its own adapter (a mixed batch,
lora.adapters) and its own token limit; each request then gets its own row. A request whose client went away
before its batch started is dropped from it (its Future was cancelled). An error of the model fails every
request of that batch and the thread goes on with the next.

S-LoRA and Punica batch adapters this way on decoder-only models; here the rows share one T5 base and differ
only in the low-rank update each adds.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .metrics import Metrics

_STOP = object()


class QueueFull(Exception):
    """The queue holds max_queue requests: the server is overloaded."""


class ModelFailed(RuntimeError):
    """The model raised while generating a batch."""


@dataclass
class Request:
    query: str
    context: str | None
    adapter: str  # an adapter's name, or "base"
    max_tokens: int
    future: Future = field(default_factory=Future)  # resolves to a banking.assistant.GeneratedRow
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        generate: Callable[[list[Request]], list],
        max_batch: int,
        window_s: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        self.generate, self.max_batch, self.window_s, self.metrics = generate, max_batch, window_s, metrics
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> Future:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        return request.future

    def depth(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout_s: float) -> None:
        """Finish the batches queued before the call, then end the thread. Past timeout_s, drop the requests
        still queued (their Futures cancelled) and wait only for the batch being generated: a thread left
        inside torch when the process exits aborts it."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item.future.cancel()
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(deadline - time.perf_counter(), 0))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if live:
                self._answer(live)
            if stop:
                return

    def _answer(self, batch: list[Request]) -> None:
        self.metrics.batch(len(batch), len({request.adapter for request in batch}))
        try:
            rows = self.generate(batch)
        except Exception as err:  # noqa: BLE001  the batch's requests fail; the server goes on
            failure = ModelFailed(
                f"the model failed on this request's batch ({type(err).__name__}: {err}); the server goes on: "
                "send the request again."
            )
            for request in batch:
                request.future.set_exception(failure)
            return
        for request, row in zip(batch, rows):
            self.metrics.tokens(row.tokens)
            request.future.set_result(row)
