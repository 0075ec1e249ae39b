"""The server's counters, written in Prometheus' text format (version 0.0.4) for GET /metrics."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return [
            *lines,
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]


class Metrics:
    """Updated by the request handlers (the event loop) and the batcher's thread, hence the lock."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0) -> None:
        self.queue_depth = queue_depth
        self._lock = threading.Lock()
        self._responses: Counter = Counter()  # (endpoint, status code)
        self._batch_size = Histogram(BATCH_BUCKETS)
        self._adapters_per_batch = Histogram(BATCH_BUCKETS)
        self._latency = Histogram(LATENCY_BUCKETS_S)
        self._tokens = 0
        self._in_flight = 0
        self._arrived = 0

    def arrived(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._arrived += 1

    def unanswered(self) -> int:
        """Requests that arrived and got no response: at shutdown, those cut off by --shutdown-timeout."""
        with self._lock:
            return self._arrived - sum(self._responses.values())

    def left(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def response(self, endpoint: str, status: int, latency_s: float | None = None) -> None:
        with self._lock:
            self._responses[endpoint, status] += 1
            if latency_s is not None:
                self._latency.observe(latency_s)

    def batch(self, size: int, adapters: int) -> None:
        with self._lock:
            self._batch_size.observe(size)
            self._adapters_per_batch.observe(adapters)

    def tokens(self, count: int) -> None:
        with self._lock:
            self._tokens += count

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP lora_serve_queue_depth Requests waiting for a batch.",
                "# TYPE lora_serve_queue_depth gauge",
                f"lora_serve_queue_depth {self.queue_depth()}",
                "# HELP lora_serve_requests_in_flight Requests received and not yet answered.",
                "# TYPE lora_serve_requests_in_flight gauge",
                f"lora_serve_requests_in_flight {self._in_flight}",
                "# HELP lora_serve_responses_total Responses sent, by endpoint and HTTP status.",
                "# TYPE lora_serve_responses_total counter",
                *(
                    f'lora_serve_responses_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self._responses.items())
                ),
                "# HELP lora_serve_batch_size Rows in each generated batch.",
                "# TYPE lora_serve_batch_size histogram",
                *self._batch_size.lines("lora_serve_batch_size"),
                "# HELP lora_serve_batch_adapters Distinct adapters in each generated batch.",
                "# TYPE lora_serve_batch_adapters histogram",
                *self._adapters_per_batch.lines("lora_serve_batch_adapters"),
                "# HELP lora_serve_request_latency_seconds Time from a request's arrival to its answer.",
                "# TYPE lora_serve_request_latency_seconds histogram",
                *self._latency.lines("lora_serve_request_latency_seconds"),
                "# HELP lora_serve_generated_tokens_total Tokens generated, </s> included.",
                "# TYPE lora_serve_generated_tokens_total counter",
                f"lora_serve_generated_tokens_total {self._tokens}",
            ]
        return "\n".join(lines) + "\n"
