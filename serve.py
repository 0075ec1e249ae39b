"""Serve the assistant over HTTP: one base model, several adapters, concurrent requests batched across adapters.

    python serve.py --adapter runs/tiny_lora                                 # model "fine_tuned", port 8000
    python serve.py --adapter retail=DIR1 --adapter business=DIR2 --max-batch 32
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "fine_tuned", "prompt": "What is my checking balance?"}'

Endpoints: OpenAI's POST /v1/completions, POST /v1/chat/completions and GET /v1/models, in which `model` names an
adapter or "base"; the assistant's own POST /v1/banking/answer ({"query", "context", "adapter", "max_tokens"}:
the answer, its status and intent); GET /health; GET /metrics (Prometheus). Answers are greedy, and each is the
answer infer.py gives to the same question with the same adapter: requests that arrive within --batch-window-ms
of each other are generated as one batch of up to --max-batch rows, each row with its own adapter.

Account figures come from an SQLite database (--accounts-db, built from the demo store on first use), for the
customer the request's API key names (--api-keys: a JSON file {"KEY": "CUSTOMER"}). Without keys every request
is --customer's, and the server binds nothing but a loopback address. SIGTERM or Ctrl-C: it stops accepting,
answers what it holds, and exits 0 (1, saying how many, if --shutdown-timeout or a second signal cut any off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from support.cli import UsageError, run_cli

DEFAULT_DB = Path("serve_accounts.sqlite3")


class Unanswered(RuntimeError):
    """The server stopped with requests it never answered."""


def main(argv: list[str] | None = None) -> int:
    from data import DataError
    from lora import AdapterError

    args = parse_args(argv)
    return run_cli(lambda: serve(args), failures=(AdapterError, Unanswered), refusals=(DataError,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="an adapter to serve, named in requests' `model` (one DIR alone is 'fine_tuned'); repeat as "
        "NAME=DIR for several on one base model",
    )
    p.add_argument("--model", help="base model: 'tiny', a directory or a hub name (default: the adapters' own)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    p.add_argument("--no-merge", action="store_true", help="keep a single adapter apart from the weights")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on a CUDA GPU that has it, else fp32",
    )
    p.add_argument(
        "--base-dtype",
        choices=["auto", "fp32", "bf16", "nf4"],
        default="auto",
        help="how the frozen base is stored, as in infer.py",
    )
    p.add_argument(
        "--grounding",
        choices=["auto", "banking", "none"],
        default="auto",
        help="as in infer.py: banking fills account figures and withholds invented ones",
    )
    batching = p.add_argument_group("batching and limits")
    batching.add_argument("--max-batch", type=int, default=32, help="rows per generated batch (default: 32)")
    batching.add_argument(
        "--batch-window-ms",
        type=float,
        default=10,
        help="how long the first request of a batch waits for others (default: 10)",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting at most; past it, 503 with Retry-After (default: 256)",
    )
    batching.add_argument(
        "--max-tokens-limit", type=int, default=512, help="the most new tokens a request may ask for (default: 512)"
    )
    batching.add_argument(
        "--max-body-bytes", type=int, default=65536, help="the largest request body; past it, 413 (default: 65536)"
    )
    batching.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60,
        help="seconds to finish the requests in flight after SIGTERM (default: 60)",
    )
    accounts = p.add_argument_group("accounts and keys")
    accounts.add_argument(
        "--accounts-db",
        type=Path,
        default=DEFAULT_DB,
        help=f"SQLite database of the customers' accounts, built from the demo store when it does "
        f"not exist (default: {DEFAULT_DB})",
    )
    accounts.add_argument(
        "--import-accounts",
        action="append",
        default=[],
        metavar="CUSTOMER=FILE",
        help="add or replace a customer's accounts from an account store JSON file (repeatable)",
    )
    accounts.add_argument(
        "--api-keys",
        type=Path,
        help='JSON file {"KEY": "CUSTOMER", ...}: each request must send one key, and is answered '
        "for its customer (needed to bind a non-loopback address)",
    )
    accounts.add_argument(
        "--customer",
        default="demo",
        help="without --api-keys, the customer every request is answered for (default: demo)",
    )
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be 1 or more.")
    if args.batch_window_ms < 0 or args.shutdown_timeout < 0:
        raise UsageError("--batch-window-ms and --shutdown-timeout cannot be negative.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is no port: pass 0 to 65535.")
    if args.api_keys is None and not is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} would let any machine that reaches it read --customer's accounts: pass "
            "--api-keys FILE to serve beyond this machine, or bind 127.0.0.1."
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is refused at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections from here on wait in the backlog until the server accepts them
    except OSError as err:
        sock.close()
        raise UsageError(f"could not bind {host}:{port} ({err.strerror}); pick another --port or --host.") from None
    return sock


def serve(args: argparse.Namespace) -> None:
    from banking.assistant import BASE

    service, sock, config = prepare(args)
    host, port = sock.getsockname()[:2]
    print(
        f"serving {', '.join(n for n in service.models if n != BASE)} and {BASE} on http://"
        f"{f'[{host}]' if ':' in host else host}:{port} (Ctrl-C or SIGTERM stops it)",
        flush=True,
    )
    asyncio.run(GracefulServer(config).serve(sockets=[sock]))
    cut = service.metrics.unanswered()
    if cut:
        raise Unanswered(
            f"stopped with {cut} request(s) unanswered: they were still in flight when --shutdown-timeout "
            f"({args.shutdown_timeout:g} s) ran out or a second signal came."
        )
    print("stopped: every request in flight was answered", flush=True)


def prepare(args: argparse.Namespace):
    """The service (model, adapters, accounts, keys, batcher), its bound socket and uvicorn's configuration:
    everything but running it, which tests do in a thread of their own."""
    import uvicorn

    from banking.assistant import Assistant
    from banking.evaluation import IntentMatcher
    from data import TRAIN_FILE, load_examples
    from infer import parse_adapters
    from serving.accounts_db import AccountsDatabase, ApiKeys
    from serving.app import Limits, Service, create_app

    validate_args(args)
    adapters = parse_adapters(args.adapter)
    imports = [value.partition("=") for value in args.import_accounts]
    if any(not customer or not equals or not path for customer, equals, path in imports):
        raise UsageError("--import-accounts takes CUSTOMER=FILE, as in --import-accounts sam=accounts_sam.json.")
    accounts = AccountsDatabase(args.accounts_db)
    for customer, _, path in imports:
        accounts.import_customer(customer, Path(path))
    keys = ApiKeys(args.api_keys, accounts.customers()) if args.api_keys else None
    if keys is None and args.customer not in accounts.customers():
        raise UsageError(f"--customer {args.customer!r} is not in {args.accounts_db}; add them with --import-accounts.")
    sock = bind(args.host, args.port)
    merge = len(adapters) == 1 and not args.no_merge
    assistant = Assistant(adapters, args.model, merge, args.precision, args.base_dtype, args.grounding)
    limits = Limits(args.max_body_bytes, args.max_tokens_limit)
    service = Service(
        assistant,
        accounts,
        keys,
        args.customer,
        limits,
        args.max_batch,
        args.batch_window_ms / 1000,
        args.max_queue,
        IntentMatcher(load_examples(TRAIN_FILE)),
    )
    app = create_app(service, args.shutdown_timeout)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout
    )
    return service, sock, config


class GracefulServer:
    """uvicorn's server, its signal handling made ours: SIGTERM and SIGINT start a graceful shutdown (stop
    accepting, answer what is in flight, then end) after which the process exits 0. uvicorn's own handling
    raises the signal again once it has shut down, which would end the process with SIGTERM's status."""

    def __init__(self, config) -> None:
        import uvicorn

        self.server = uvicorn.Server(config)
        self.server.capture_signals = self._signals

    @contextlib.contextmanager
    def _signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _stop(self, sig) -> None:
        if self.server.should_exit:  # a second signal: stop waiting for the requests in flight
            self.server.force_exit = True
        self.server.should_exit = True
        print(
            f"{signal.Signals(sig).name}: finishing the requests in flight, accepting no more",
            file=sys.stderr,
            flush=True,
        )

    async def serve(self, sockets) -> None:
        await self.server.serve(sockets=sockets)


if __name__ == "__main__":
    raise SystemExit(main())
