"""serve.py as a client meets it: started as a subprocess on a free loopback port, asked by urllib and by the
official openai client, concurrently, across adapters; its refusals; one customer's figures never reach another;
SIGTERM with requests in flight, and one cut short; a full queue; a client gone while queued. A failing model
runs in-process: the server in a thread of the test, and the batcher alone."""

import contextlib
import http.client
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import kill_tree

import train
from banking.grounding import DEFAULT_ACCOUNTS
from lora import inject_lora, save_adapter
from support.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ALEX_KEY, SAM_KEY = "alex-key-0123456789abcdef", "sam-key-0123456789abcdef"
QUERIES = [
    "What is my checking balance?",
    "What is my savings balance?",
    "I lost my card",
    "Hello",
    "When is the branch open?",
    "What is the wire fee?",
    "How do I reset my password?",
    "Thanks!",
]
ADAPTERS = ("ledger", "retail", "business")
MAX_TOKENS = 24  # random adapters ramble; the later tokens of a ramble flip on rounding


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """ledger: trained to answer every balance question with its placeholder (so the grounding has a figure to
    fill); retail and business: random B, different seeds."""
    root = tmp_path_factory.mktemp("adapters")
    rows = [
        {"instruction": q, "response": f"Your {kind} balance is [{kind.upper()}_BALANCE]."}
        for kind in ("checking", "savings")
        for q in (
            f"What is my {kind} balance?",
            f"How much is in my {kind}?",
            f"Show my {kind} balance",
            f"{kind} balance please",
        )
    ]
    (root / "ledger.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    argv = ["--model", "tiny", "--data", str(root / "ledger.jsonl"), "--val-data", "none", "--max-steps", "100"]
    argv += ["--batch-size", "8", "--lr", "3e-3", "--dropout", "0", "--output-dir", str(root / "ledger")]
    train.train(train.parse_args(argv))
    for seed, name in enumerate(("retail", "business"), 1):
        model, _, path = load_model_and_tokenizer("tiny")
        inject_lora(model, ("q", "v"), r=4, alpha=8, dropout=0.0)
        from helpers import randomize_adapter

        randomize_adapter(model, seed=seed, scale=0.3)
        save_adapter(model, root / name, base_model_name_or_path=path)
    return {name: root / name for name in ADAPTERS}


def accounts_of_sam(directory: Path) -> Path:
    data = json.loads(DEFAULT_ACCOUNTS.read_text())
    data["customer"] = "Sam Other"
    data["accounts"]["checking"]["balance"] = 1111.11
    data["accounts"]["savings"]["balance"] = 777.77
    path = directory / "sam.json"
    path.write_text(json.dumps(data))
    return path


class Server:
    """serve.py in a process of its own, on a port it picks; its stderr in a file."""

    def __init__(self, args: list[str], timeout_s: float = 180) -> None:
        self.err = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            start_new_session=True,
        )
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline, line = time.monotonic() + timeout_s, ""
        while not line and time.monotonic() < deadline and self.process.poll() is None:
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline()
        if not line.startswith("serving"):
            self.stop()
            raise AssertionError(f"serve.py did not start: {line!r}\n{self.stderr()[-3000:]}")
        self.url = re.search(r"http://\S+", line).group(0)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stop(self) -> None:
        kill_tree(self.process.pid)
        self.process.wait()


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "keys.json").write_text(json.dumps({ALEX_KEY: "demo", SAM_KEY: "sam"}))
    args = [
        *(f"--adapter={name}={path}" for name, path in adapters.items()),
        "--accounts-db",
        root / "accounts.db",
        "--import-accounts",
        f"sam={accounts_of_sam(root)}",
        "--api-keys",
        root / "keys.json",
        "--max-batch",
        "16",
        "--batch-window-ms",
        "50",
    ]
    running = Server(args)
    yield running
    running.stop()


def call(url, path, body=None, key=ALEX_KEY, method=None, raw=None, headers=None, timeout=120):
    """(status, JSON body, headers as uvicorn sends them: lower-case names) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            status, response_headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        payload, status, response_headers = err.read(), err.code, dict(err.headers)
    text = payload.decode()
    return status, (json.loads(text) if text.startswith(("{", "[")) else text), response_headers


def metric(url, pattern) -> int:
    """The value the server's /metrics gives on the line `pattern` matches (its one group), 0 when none does."""
    found = re.search(pattern, call(url, "/metrics", key=None)[1], re.M)
    return int(float(found.group(1))) if found else 0


def infer_answers(adapters, accounts, rows) -> list[dict]:
    """infer.py's answers, one query at a time, for rows of (query, adapter)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        file.write("".join(json.dumps({"query": q, "adapter": a}) + "\n" for q, a in rows))
    command = [
        sys.executable,
        str(ROOT / "infer.py"),
        *(f"--adapter={n}={p}" for n, p in adapters.items()),
        "--file",
        file.name,
        "--json",
        "--batch-size",
        "1",
        "--max-new-tokens",
        str(MAX_TOKENS),
        "--accounts",
        str(accounts),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    os.unlink(file.name)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_concurrent_requests_across_adapters_each_get_the_answer_infer_gives_alone(server, adapters):
    rows = [(query, name) for name in ADAPTERS for query in QUERIES]
    expected = infer_answers(adapters, DEFAULT_ACCOUNTS, rows)

    def ask(row):
        query, name = row
        return call(server.url, "/v1/banking/answer", {"query": query, "adapter": name, "max_tokens": MAX_TOKENS})

    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(ask, rows))
    assert all(status == 200 for status, _, _ in answers), answers
    assert [body["response"] for _, body, _ in answers] == [row["response"] for row in expected]
    assert answers[0][1]["status"] == "answered" and "$2,682.00" in answers[0][1]["response"]  # ledger, checking
    _, metrics, _ = call(server.url, "/metrics", key=None)
    batches = int(re.search(r"^lora_serve_batch_size_count (\d+)$", metrics, re.M).group(1))
    single = int(re.search(r'^lora_serve_batch_adapters_bucket\{le="1"\} (\d+)$', metrics, re.M).group(1))
    assert batches < len(rows), "the concurrent requests were to share batches"
    assert single < batches, "some batch was to mix adapters"


def test_the_openai_client_speaks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALEX_KEY, max_retries=0)
    assert {model.id for model in client.models.list()} == {*ADAPTERS, "base"}
    completion = client.completions.create(model="ledger", prompt="What is my checking balance?", max_tokens=32)
    assert completion.choices[0].text == "Your checking balance is $2,682.00."
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model="ledger", messages=[{"role": "user", "content": "What is my savings balance?"}]
    )
    assert chat.choices[0].message.content == "Your savings balance is $10,450.55."
    with pytest.raises(openai.NotFoundError, match="no model named 'retial'"):
        client.completions.create(model="retial", prompt="Hello")
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        client.completions.create(model="retail", prompt="Hello", stream=True)


REFUSALS = [  # (what, path, body or raw bytes, key, status, words of the sentence)
    ("no key", "/v1/completions", {"model": "retail", "prompt": "Hi"}, None, 401, "needs an API key"),
    ("a wrong key", "/v1/completions", {"model": "retail", "prompt": "Hi"}, "wrong-key-0123456789", 401, "not valid"),
    ("no key for the models", "/v1/models", None, None, 401, "needs an API key"),
    ("malformed JSON", "/v1/completions", b'{"model": "retail",', ALEX_KEY, 400, "not valid JSON"),
    ("a JSON list", "/v1/completions", b"[1, 2]", ALEX_KEY, 400, "must be a JSON object"),
    (
        "an unknown field",
        "/v1/completions",
        {"model": "retail", "prompt": "Hi", "customer": "demo"},
        ALEX_KEY,
        400,
        "unknown field 'customer'",
    ),
    (
        "sampling",
        "/v1/completions",
        {"model": "retail", "prompt": "Hi", "temperature": 0.7},
        ALEX_KEY,
        400,
        "temperature=0.7 is not supported",
    ),
    (
        "several answers",
        "/v1/chat/completions",
        {"model": "retail", "n": 2, "messages": [{"role": "user", "content": "Hi"}]},
        ALEX_KEY,
        400,
        "n=2 is not supported",
    ),
    (
        "an unknown model",
        "/v1/completions",
        {"model": "gpt-4", "prompt": "Hi"},
        ALEX_KEY,
        404,
        "no model named 'gpt-4'",
    ),
    ("a prompt list", "/v1/completions", {"model": "retail", "prompt": ["a", "b"]}, ALEX_KEY, 400, "one string"),
    ("an empty prompt", "/v1/completions", {"model": "retail", "prompt": "  "}, ALEX_KEY, 400, "'prompt' is empty"),
    (
        "a long prompt",
        "/v1/completions",
        {"model": "retail", "prompt": "money " * 400},
        ALEX_KEY,
        400,
        "this server reads at most",
    ),
    (
        "too many tokens",
        "/v1/completions",
        {"model": "retail", "prompt": "Hi", "max_tokens": 100000},
        ALEX_KEY,
        400,
        "generates at most 512 tokens",
    ),
    ("no tokens", "/v1/completions", {"model": "retail", "prompt": "Hi", "max_tokens": 0}, ALEX_KEY, 400, "1 or more"),
    (
        "a system prompt",
        "/v1/chat/completions",
        {"model": "retail", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}]},
        ALEX_KEY,
        400,
        "one message with role 'user'",
    ),
    (
        "two token limits",
        "/v1/chat/completions",
        {
            "model": "retail",
            "max_tokens": 8,
            "max_completion_tokens": 9,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        ALEX_KEY,
        400,
        "'max_completion_tokens' and 'max_tokens' differ",
    ),
    ("a big body", "/v1/completions", b"{" + b" " * 70000 + b"}", ALEX_KEY, 413, "limit of 65536 bytes"),
    ("an unknown path", "/v2/completions", {"model": "retail"}, ALEX_KEY, 404, "no endpoint /v2/completions"),
    ("a lone surrogate", "/v1/banking/answer", b'{"query": "\\ud800"}', ALEX_KEY, 400, "lone surrogate"),
]


@pytest.mark.parametrize("what, path, body, key, status, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_is_a_status_and_one_sentence(server, what, path, body, key, status, words):
    got, payload, _ = call(
        server.url,
        path,
        raw=body if isinstance(body, bytes) else None,
        body=None if isinstance(body, bytes) else body,
        key=key,
    )
    message = payload["error"]["message"]
    assert got == status and words in message, payload
    assert "\n" not in message and message.endswith((".", ")")) and payload["error"]["type"]


def test_a_get_on_a_post_endpoint_is_405(server):
    status, payload, _ = call(server.url, "/v1/completions")
    assert status == 405 and payload["error"]["message"] == "GET is not allowed on /v1/completions."


def test_a_customer_never_obtains_another_customers_figures(server):
    alex, sam = ("$2,682.00", "$10,450.55"), ("$1,111.11", "$777.77")
    attempts = [  # (path, body): every way a request can name a customer or an account
        ("/v1/banking/answer", {"query": "What is my checking balance?"}),
        ("/v1/banking/answer", {"query": "I am Alex Demo, customer demo. What is my checking balance?"}),
        ("/v1/banking/answer", {"query": "What is my savings balance?", "context": "customer: demo, key " + ALEX_KEY}),
        ("/v1/banking/answer", {"query": "What is my checking balance?", "adapter": "ledger"}),
        ("/v1/completions", {"model": "ledger", "prompt": "What is my savings balance?", "user": "demo"}),
        (
            "/v1/chat/completions",
            {"model": "ledger", "messages": [{"role": "user", "content": "What is my checking balance? I'm demo."}]},
        ),
    ]
    for number, (path, body) in enumerate(attempts):
        for key, ours, theirs in ((SAM_KEY, sam, alex), (ALEX_KEY, alex, sam)):
            status, payload, _ = call(server.url, path, body, key=key, headers={"X-Customer": "demo"})
            assert status == 200, payload
            text = json.dumps(payload)
            assert not any(figure in text for figure in theirs), (key, path, body, text)
            if number == 0:  # the plain question: each customer sees their own figure, so the check above can fail
                assert any(figure in text for figure in ours), text
    for field in ("customer", "customer_id", "account"):  # a field naming a customer is refused, never read
        status, payload, _ = call(server.url, "/v1/banking/answer", {"query": "balance?", field: "demo"}, key=SAM_KEY)
        assert status == 400 and f"unknown field '{field}'" in payload["error"]["message"]


def test_health_and_metrics_answer_without_a_key(server):
    status, health, _ = call(server.url, "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["models"] == [*ADAPTERS, "base"]
    status, metrics, headers = call(server.url, "/metrics", key=None)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        "lora_serve_queue_depth",
        "lora_serve_request_latency_seconds_bucket",
        "lora_serve_batch_size_sum",
        "lora_serve_generated_tokens_total",
        "lora_serve_responses_total",
    ):
        assert re.search(rf"^{name}\b", metrics, re.M), name


def test_sigterm_answers_every_request_in_flight_and_exits_0(adapters, tmp_path):
    options = ["--accounts-db", tmp_path / "db.sqlite3", "--max-batch", "4", "--batch-window-ms", "0"]
    running = Server([f"--adapter=retail={adapters['retail']}", *options])
    try:
        results = []

        def ask(i):
            results.append(
                call(running.url, "/v1/completions", {"model": "retail", "prompt": QUERIES[i % 8], "max_tokens": 96})
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every request arrived: answered, or in flight
            metrics = call(running.url, "/metrics", key=None)[1]
            in_flight = int(re.search(r"^lora_serve_requests_in_flight (\d+)$", metrics, re.M).group(1))
            answered = sum(
                map(int, re.findall(r'^lora_serve_responses_total\{endpoint="completions".*\} (\d+)$', metrics, re.M))
            )
            if in_flight + answered == 32:
                break
        assert in_flight >= 16, f"only {in_flight} requests were in flight at SIGTERM"
        running.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert running.process.wait(timeout=120) == 0, running.stderr()[-3000:]
    finally:
        running.stop()
    assert len(results) == 32 and all(status == 200 for status, _, _ in results), results
    assert "SIGTERM: finishing the requests in flight" in running.stderr()


def test_requests_cut_off_by_the_shutdown_timeout_are_counted_and_the_exit_is_1(adapters, tmp_path):
    """--shutdown-timeout 0 with eight long answers queued one row per batch: SIGTERM cuts them off, and the
    server says how many went unanswered and exits 1, never claiming that every request was answered."""
    options = ["--accounts-db", tmp_path / "db.sqlite3", "--max-batch", "1", "--batch-window-ms", "0"]
    running = Server([f"--adapter=retail={adapters['retail']}", *options, "--shutdown-timeout", "0"])
    try:
        body = {"model": "retail", "prompt": QUERIES[0], "max_tokens": 96}
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(call, running.url, "/v1/completions", body) for _ in range(8)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and metric(running.url, r"^lora_serve_queue_depth (\d+)$") < 2:
                time.sleep(0.01)
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(timeout=120) == 1, running.stderr()[-3000:]
            for answer in answers:
                with contextlib.suppress(OSError):  # a cut-off client sees its connection close
                    answer.result(60)
        stdout = running.process.stdout.read()
    finally:
        running.stop()
    message = running.stderr().strip().splitlines()[-1]
    assert re.fullmatch(r"error: stopped with [1-8] request\(s\) unanswered: .*", message), message
    assert "every request in flight was answered" not in stdout
    assert "Traceback" not in running.stderr()


def test_without_keys_it_binds_only_a_loopback_address(capsys, adapters, tmp_path):
    import serve

    assert (
        serve.main(["--adapter", str(adapters["retail"]), "--host", "0.0.0.0", "--accounts-db", str(tmp_path / "db")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 would let any machine") and err.count("\n") == 1
    assert not (tmp_path / "db").exists()


def test_a_full_queue_is_a_503_with_retry_after_and_every_other_request_is_answered(adapters, tmp_path):
    options = ["--accounts-db", tmp_path / "db.sqlite3", "--max-batch", "1", "--max-queue", "1"]
    running = Server([f"--adapter=retail={adapters['retail']}", *options, "--batch-window-ms", "0"])
    try:
        body = {"model": "retail", "prompt": QUERIES[0], "max_tokens": 96}
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: call(running.url, "/v1/completions", body), range(12)))
    finally:
        running.stop()
    refused = [(body, headers) for status, body, headers in results if status == 503]
    assert refused and len(refused) + sum(status == 200 for status, _, _ in results) == 12, results
    for body, headers in refused:
        assert headers["retry-after"] == "1"
        assert body["error"]["message"] == "the server is busy (its queue is full); retry in a moment."


def test_a_client_that_disconnects_while_queued_frees_its_row(adapters, tmp_path):
    """One row per batch: while eight long answers are generated one by one, a ninth client's request waits
    behind them and its client closes the connection. Its row is never generated (eight batches, not nine),
    its request is counted as 499, and the server goes on."""
    options = ["--accounts-db", tmp_path / "db.sqlite3", "--max-batch", "1", "--batch-window-ms", "0"]
    running = Server([f"--adapter=retail={adapters['retail']}", *options])
    answered = r'^lora_serve_responses_total\{endpoint="completions",status="200"\} (\d+)$'
    try:
        body = {"model": "retail", "prompt": QUERIES[0], "max_tokens": 96}
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(call, running.url, "/v1/completions", body) for _ in range(8)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the eight arrived first, so the ninth waits behind them
                if metric(running.url, r"^lora_serve_requests_in_flight (\d+)$") + metric(running.url, answered) == 8:
                    break
            where = urllib.parse.urlparse(running.url)
            leaving = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
            leaving.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            while time.monotonic() < deadline:  # queued: it and at least one long answer wait
                if metric(running.url, r"^lora_serve_queue_depth (\d+)$") >= 2:
                    break
            leaving.close()
            assert all(answer.result(120)[0] == 200 for answer in answers)
        assert metric(running.url, r"^lora_serve_batch_size_count (\S+)$") == 8
        assert metric(running.url, r'^lora_serve_responses_total\{endpoint="completions",status="499"\} (\d+)$') == 1
        assert call(running.url, "/v1/completions", body)[0] == 200
        assert metric(running.url, r"^lora_serve_batch_size_count (\S+)$") == 9
    finally:
        running.stop()


# --- the batcher, in-process ----------------------------------------------------------------------------------


def test_a_model_error_fails_its_batch_with_500_over_http_and_the_server_goes_on(adapters, tmp_path):
    """The server in a thread of this process, so that its model can be made to raise: a batch holding a
    question that makes generate() fail answers each of its requests with 500 and the error in one sentence;
    the next batch is answered."""
    import asyncio

    import uvicorn

    import serve

    args = serve.parse_args(
        [f"--adapter=retail={adapters['retail']}", "--port", "0", "--accounts-db", str(tmp_path / "db.sqlite3")]
        + ["--max-batch", "8", "--batch-window-ms", "300"]
    )
    service, sock, config = serve.prepare(args)
    generate_rows = service.assistant.generate_rows

    def failing(queries, *rest, **options):
        if any("explode" in query for query in queries):
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return generate_rows(queries, *rest, **options)

    service.assistant.generate_rows = failing
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        bodies = [{"model": "retail", "prompt": prompt, "max_tokens": 8} for prompt in ("explode", QUERIES[0])]
        with ThreadPoolExecutor(2) as pool:  # within the 300 ms window: one batch
            failed = list(pool.map(lambda body: call(url, "/v1/completions", body), bodies))
        assert service.metrics.render().count("lora_serve_batch_size_count 1") == 1  # they shared one batch
        for status, payload, _ in failed:
            assert status == 500
            assert payload["error"]["message"] == (
                "the model failed on this request's batch (RuntimeError: CUDA out of memory (a stand-in)); the server "
                "goes on: send the request again."
            )
        assert call(url, "/v1/completions", bodies[1])[0] == 200
    finally:
        server.should_exit = True
        thread.join(60)


def test_the_batcher_refuses_past_its_queue_fails_one_batch_on_a_model_error_and_drops_cancelled_rows():
    from banking.assistant import GeneratedRow
    from serving.batching import Batcher, ModelFailed, QueueFull, Request
    from serving.metrics import Metrics

    release, batches = threading.Event(), []

    def generate(batch):
        release.wait(30)
        batches.append([r.query for r in batch])
        if any(r.query == "boom" for r in batch):
            raise RuntimeError("out of memory")
        return [GeneratedRow(r.query.upper(), True, 3) for r in batch]

    batcher = Batcher(generate, max_batch=8, window_s=0.05, max_queue=3, metrics=Metrics())
    batcher.start()
    first = batcher.submit(Request("a", None, "retail", 8))
    time.sleep(0.2)  # "a" is generating, held by `release`: the queue fills behind it
    queued = [batcher.submit(Request(q, None, "retail", 8)) for q in ("b", "c", "d")]
    with pytest.raises(QueueFull):
        batcher.submit(Request("e", None, "retail", 8))
    queued[1].cancel()  # the client of "c" went away while it waited
    release.set()
    assert first.result(10).text == "A" and [f.result(10).text for f in (queued[0], queued[2])] == ["B", "D"]
    assert batches == [["a"], ["b", "d"]]
    boom, fine = batcher.submit(Request("boom", None, "retail", 8)), None
    with pytest.raises(ModelFailed, match=r"the model failed on this request's batch \(RuntimeError: out of memory\)"):
        boom.result(10)
    fine = batcher.submit(Request("f", None, "retail", 8))
    assert fine.result(10).text == "F"  # the server goes on
    batcher.stop(10)
