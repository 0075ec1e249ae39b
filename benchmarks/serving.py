"""Serving: serve.py on the tiny model with three adapters of random B, so each request's work is an answer of
up to --new-tokens tokens. The three hold the same values, each its own copy, so that every server generates
the same answers to the same requests and only the batching differs (an adapter's cost does not depend on its
values). Three servers, started at once (an idle one waits without computing): batched across adapters
(--max-batch 64, a 10 ms window), every client's requests spread over the three adapters; the same with
--max-batch 1 (one request at a time); and batched with every request for one adapter (batches without
mixing). Clients: 1, 8, 32 and 64 at once, each sending its next request when its answer comes, 8 requests
a client (32 at least) so that the ramp and the drain are short; the median throughput of 5 runs (2 with
--quick), each run driving the three servers in turn, so that a drift in the machine's speed meets all
three. Then, unless --quick, 64 clients for a minute against the first: every request must get exactly one
answer (the clients' count against the server's own)."""

from __future__ import annotations

import http.client
import json
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlparse

from data import TEST_FILE, load_examples
from lora import inject_lora, lora_layers, save_adapter
from support.models import load_model_and_tokenizer

ADAPTERS = ("retail", "business", "support")
MIXED = "batched, 3 adapters mixed"
SERVERS = {  # name: (serve.py options, the adapters the clients ask for)
    MIXED: (["--max-batch", "64", "--batch-window-ms", "10"], ADAPTERS),
    "--max-batch 1, 3 adapters": (["--max-batch", "1", "--batch-window-ms", "0"], ADAPTERS),
    "batched, 1 adapter": (["--max-batch", "64", "--batch-window-ms", "10"], ADAPTERS[:1]),
}
SOAK_S = 60
RUNS = 5  # per server and number of clients: the median throughput, the latency percentiles of all requests


def bench_serving(args, rows, batch_indices) -> list[dict]:
    import torch

    levels = (1, 8) if args.quick else (1, 8, 32, 64)
    queries = [row["instruction"] for row in load_examples(TEST_FILE)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for name in ADAPTERS:
            model, _, path = load_model_and_tokenizer("tiny")
            inject_lora(model, ("q", "v"), r=16, alpha=32, dropout=0.0)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
            save_adapter(model, Path(tmp) / name, base_model_name_or_path=path)
            adapters.append(f"--adapter={name}={Path(tmp) / name}")
        db = ["--accounts-db", str(Path(tmp) / "accounts.db")]
        with ExitStack() as servers:
            urls = {server: servers.enter_context(running_server([*adapters, *options, *db]))
                    for server, (options, _) in SERVERS.items()}  # fmt: skip
            for server, (_, asked) in SERVERS.items():
                drive(urls[server], 4, 8, asked, queries, args.new_tokens)  # warm-up
            for clients in levels:
                # 8 requests a client: the ramp and the drain are short
                total = 8 if args.quick else max(32, 8 * clients)
                runs = {server: [] for server in SERVERS}
                for _ in range(2 if args.quick else RUNS):
                    for server, (_, asked) in SERVERS.items():
                        runs[server].append(drive(urls[server], clients, total, asked, queries, args.new_tokens))
                results += [{"server": server, "clients": clients, **summary(runs[server])} for server in SERVERS]
            if not args.quick:
                results.append({"server": f"batched, 64 clients for {SOAK_S} s", "clients": 64,
                                **soak(urls[MIXED], 64, SOAK_S, ADAPTERS, queries, args.new_tokens)})  # fmt: skip
        results.sort(key=lambda row: list(SERVERS).index(row["server"]) if row["server"] in SERVERS else len(SERVERS))
    return results


@contextmanager
def running_server(options: list[str]):
    process = subprocess.Popen([sys.executable, "-m", "serve", "--port", "0", *options], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        line, deadline = "", time.monotonic() + 300
        while not line and process.poll() is None and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = process.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"serve.py did not start (exit {process.poll()}): {line!r}")
        yield re.search(r"http://\S+", line).group(0)
    finally:
        process.terminate()
        process.wait(120)


def drive(url: str, clients: int, total: int, asked, queries, max_tokens: int) -> dict:
    """`clients` threads, each with its own keep-alive connection, send `total` requests between them, the next
    as soon as its answer comes; throughput and every request's latency."""
    latencies, statuses, lock, counter = [], [], threading.Lock(), iter(range(total))

    def client():
        connection = connect(url)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            status, _ = post(connection, asked[i % len(asked)], queries[i % len(queries)], max_tokens)
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses.append(status)
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"requests": total, "failed": total - statuses.count(200), "answers_per_s": statuses.count(200) / wall,
            "latencies": latencies}  # fmt: skip


def summary(runs: list[dict]) -> dict:
    """The runs' requests, failures, median throughput, and latency percentiles over all their requests."""
    latencies = [latency for run in runs for latency in run["latencies"]]
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": sum(run["requests"] for run in runs), "failed": sum(run["failed"] for run in runs),
            "answers_per_s": statistics.median(run["answers_per_s"] for run in runs), "p50_s": cuts[49],
            "p99_s": cuts[98]}  # fmt: skip


def soak(url: str, clients: int, seconds: float, asked, queries, max_tokens: int) -> dict:
    """Every client sends requests for `seconds`; each must come back exactly once, with status 200, under an
    id no other answer has, and the server must count as many answers as the clients received."""
    before = answered_by_server(url)
    sent, ids, statuses, lock = [0], [], [], threading.Lock()
    end = time.monotonic() + seconds

    def client(k):
        connection = connect(url)
        i = k
        while time.monotonic() < end:
            with lock:
                sent[0] += 1
            status, body = post(connection, asked[i % len(asked)], queries[i % len(queries)], max_tokens)
            with lock:
                statuses.append(status)
                ids.append(body.get("id"))
            i += clients
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = statuses.count(200)
    lost = sent[0] - ok
    twice = len(ids) - len(set(ids)) + abs((answered_by_server(url) - before) - ok)  # the server's count too
    return {"requests": sent[0], "failed": lost + twice, "answers_per_s": ok / wall, "p50_s": None, "p99_s": None}


def connect(url: str) -> http.client.HTTPConnection:
    where = urlparse(url)
    return http.client.HTTPConnection(where.hostname, where.port, timeout=600)


def post(connection, model: str, prompt: str, max_tokens: int) -> tuple[int, dict]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def answered_by_server(url: str) -> int:
    connection = connect(url)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return sum(
        map(int, re.findall(r'^lora_serve_responses_total\{endpoint="completions",status="200"\} (\d+)$', text, re.M))
    )


def plot_serving(results: list[dict], path: Path) -> None:
    """Answers per second and p99 latency against concurrent clients, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora.inspect import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server in SERVERS:
        points = [(r["clients"], r["answers_per_s"], r["p99_s"]) for r in results if r["server"] == server]
        if points:
            clients, throughput, p99 = zip(*points)
            left.plot(clients, throughput, marker="o", label=server)
            right.plot(clients, p99, marker="o", label=server)
    for ax, label in ((left, "answers per second"), (right, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
    left.legend()
    save_figure(fig, path, plt)
