"""The HTTP interface: OpenAI's completions, chat completions and models, the assistant's own answer, health
and metrics, on Starlette. Every refusal is an OpenAI-style error body holding one sentence.

Every answer goes through the grounding infer.py applies (banking/grounding.py): account figures are filled
in by code from the accounts of the customer the request's API key names, never from anything the request
says, and a figure the store cannot give is withheld.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from banking.assistant import BASE, Assistant
from banking.evaluation import IntentMatcher
from banking.grounding import shown

from .accounts_db import AccountsDatabase, ApiKeys
from .batching import Batcher, ModelFailed, QueueFull, Request
from .metrics import Metrics

# Fields a client may send that change nothing when they hold these values (OpenAI's clients send some of
# them explicitly); any other value is refused, never ignored.
NEUTRAL = {
    "temperature": (None, 0, 0.0),
    "top_p": (None, 1, 1.0),
    "n": (None, 1),
    "stream": (None, False),
    "stop": (None, [], ""),
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "seed": (None,),
    "stream_options": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
WHY_NOT = {
    "temperature": "it decodes greedily, so answers are repeatable",
    "top_p": "it decodes greedily",
    "n": "it gives one answer per request",
    "stream": "answers come whole, once their batch is generated",
    "best_of": "it gives one answer per request",
    "seed": "it decodes greedily, so there is nothing to seed",
}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "user", *NEUTRAL}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "user", *NEUTRAL}
BANKING_FIELDS = {"query", "context", "adapter", "max_tokens"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


@dataclass
class Limits:
    max_body_bytes: int  # a larger body is refused with 413
    max_tokens: int  # the most new tokens a request may ask for


class Service:
    """What the handlers share: the assistant, the batcher, the accounts and keys, the limits, the metrics."""

    def __init__(
        self,
        assistant: Assistant,
        accounts: AccountsDatabase,
        keys: ApiKeys | None,
        customer: str,
        limits: Limits,
        max_batch: int,
        window_s: float,
        max_queue: int,
        intents: IntentMatcher,
    ) -> None:
        self.assistant, self.accounts, self.keys, self.customer = assistant, accounts, keys, customer
        self.limits, self.intents, self.started = limits, intents, int(time.time())
        self.tokenizer = copy.deepcopy(assistant.tokenizer)  # the batcher's thread uses the assistant's
        self.metrics = Metrics()
        self.batcher = Batcher(self._generate, max_batch, window_s, max_queue, self.metrics)
        self.metrics.queue_depth = self.batcher.depth
        self.models = [*assistant.names, BASE]

    def _generate(self, batch: list[Request]) -> list:
        a = self.assistant
        return a.generate_rows(
            [r.query for r in batch],
            [r.adapter for r in batch],
            [r.context for r in batch],
            [r.max_tokens for r in batch],
            num_beams=1,
            do_sample=False,
        )

    def customer_of(self, request: HttpRequest) -> str:
        """The customer the request's API key names; with no keys configured (loopback only), --customer."""
        if self.keys is None:
            return self.customer
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "this server needs an API key: send it as the header Authorization: Bearer KEY.",
                "authentication_error",
            )
        customer = self.keys.customer(key.strip())
        if customer is None:
            raise ApiError(401, "the API key is not valid; check it, or ask for one.", "authentication_error")
        return customer

    async def body(self, request: HttpRequest, fields: set[str]) -> dict:
        """The request's JSON object, refused when too big, malformed, or holding a field this server does not
        read or would have to ignore."""
        limit = self.limits.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err}).") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ApiError(
                400, f"unknown field {unknown[0]!r}: this endpoint reads {', '.join(sorted(fields - set(NEUTRAL)))}."
            )
        for name, neutral in NEUTRAL.items():
            if name in body and body[name] not in neutral:
                why = WHY_NOT.get(name, "this server does not implement it")
                raise ApiError(400, f"{name}={json.dumps(body[name])} is not supported: {why}; leave it out.")
        return body

    def model_of(self, body: dict, field: str = "model") -> str:
        name = body.get(field)
        if not isinstance(name, str):
            raise ApiError(400, f"'{field}' must name an adapter: one of {', '.join(self.models)}.")
        if name not in self.models:
            raise ApiError(
                404, f"no model named {name!r}: this server serves {', '.join(self.models)} (GET /v1/models)."
            )
        return name

    def max_tokens_of(self, body: dict, *fields: str) -> int:
        """The token limit the request gives in any of `fields` (the same value if in several), or the default."""
        given = [field for field in fields if body.get(field) is not None]
        if len({json.dumps(body[field]) for field in given}) > 1:
            raise ApiError(400, f"{' and '.join(repr(f) for f in given)} differ: send one of them.")
        if not given:
            return min(self.assistant.max_new_tokens, self.limits.max_tokens)
        field, value = given[0], body[given[0]]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"'{field}' must be a whole number of tokens, 1 or more.")
        if value > self.limits.max_tokens:
            raise ApiError(400, f"'{field}' is {value}; this server generates at most {self.limits.max_tokens} tokens.")
        return value

    def check_prompt(self, query: str, context: str | None, field: str) -> int:
        """The prompt's length in tokens, refused when empty or longer than the adapters were trained to read."""
        if not query.strip():
            raise ApiError(400, f"'{field}' is empty: send a question.")
        try:
            (query + (context or "")).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{field}' holds a lone surrogate, which is no character: fix the text.") from None
        from data import build_prompt

        length = len(self.tokenizer(build_prompt(query, context)).input_ids)
        if length > self.assistant.max_source_len:
            raise ApiError(
                400,
                f"the prompt is {length} tokens; this server reads at most "
                f"{self.assistant.max_source_len} (what the adapters were trained on): shorten it.",
            )
        return length

    async def answer(
        self, request: HttpRequest, customer: str, query: str, context: str | None, model: str, max_tokens: int
    ) -> dict:
        """Queue the query, wait for its row (or for the client to go away), and ground it in the customer's
        accounts: the answer, and what the OpenAI endpoints report of it."""
        try:
            future = self.batcher.submit(Request(query, context, model, max_tokens))
        except QueueFull:
            raise ApiError(
                503,
                "the server is busy (its queue is full); retry in a moment.",
                "overloaded_error",
                {"Retry-After": "1"},
            ) from None
        row = await wait_or_disconnect(request, future)
        store = self.accounts.store(customer)
        grounded = shown(row.text, query, store, row.complete, self.assistant.grounded(model))
        return {"row": row, "grounded": grounded}


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def wait_or_disconnect(request: HttpRequest, future):
    """The request's row; if the client goes first, its Future is cancelled: a row still queued is dropped
    from the batch it would have joined."""
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # cut off by --shutdown-timeout: a row still queued is dropped too
        future.cancel()
        gone.cancel()
        raise
    if answer in done:
        gone.cancel()
        try:
            return answer.result()
        except ModelFailed as err:
            raise ApiError(500, str(err), "server_error") from None
    future.cancel()
    answer.cancel()
    raise ClientGone


async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, shutdown_timeout_s: float = 30) -> Starlette:
    s = service

    def endpoint(name: str, handler):
        async def handle(request: HttpRequest):
            start = time.perf_counter()
            s.metrics.arrived()
            try:
                response = await handler(request)
            except ApiError as err:
                response = error_response(err.status, err.message, err.kind, err.headers)
            except ClientGone:
                s.metrics.response(name, 499)  # nginx's "client closed request": nobody reads a response
                return PlainTextResponse("", status_code=499)
            except asyncio.CancelledError:  # --shutdown-timeout ran out: counted as unanswered, no traceback
                return error_response(503, "the server stopped before answering; send the request again.")
            except Exception as err:  # noqa: BLE001  this request fails; the server goes on
                traceback.print_exc()
                message = f"the server failed on this request ({type(err).__name__}: {err}); it goes on serving."
                response = error_response(500, message, "server_error")
            finally:
                s.metrics.left()
            s.metrics.response(name, response.status_code, time.perf_counter() - start)
            return response

        return handle

    async def health(request):
        return JSONResponse({"status": "ok", "models": s.models, "queue_depth": s.batcher.depth()})

    async def metrics(request):
        return PlainTextResponse(s.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request):
        s.customer_of(request)
        data = [{"id": name, "object": "model", "created": s.started, "owned_by": "lora-t5"} for name in s.models]
        return JSONResponse({"object": "list", "data": data})

    async def completions(request):
        customer = s.customer_of(request)
        body = await s.body(request, COMPLETION_FIELDS)
        model, prompt = s.model_of(body), body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be one string (send one request per question).")
        prompt_tokens = s.check_prompt(prompt, None, "prompt")
        result = await s.answer(request, customer, prompt, None, model, s.max_tokens_of(body, "max_tokens"))
        return completion("text_completion", model, {"text": result["grounded"].response}, result["row"], prompt_tokens)

    async def chat(request):
        customer = s.customer_of(request)
        body = await s.body(request, CHAT_FIELDS)
        model, query = s.model_of(body), user_message(body.get("messages"))
        prompt_tokens = s.check_prompt(query, None, "messages")
        max_tokens = s.max_tokens_of(body, "max_completion_tokens", "max_tokens")
        result = await s.answer(request, customer, query, None, model, max_tokens)
        message = {"message": {"role": "assistant", "content": result["grounded"].response}}
        return completion("chat.completion", model, message, result["row"], prompt_tokens)

    async def banking_answer(request):
        customer = s.customer_of(request)
        body = await s.body(request, BANKING_FIELDS)
        query, context = body.get("query"), body.get("context")
        if not isinstance(query, str) or not (context is None or isinstance(context, str)):
            raise ApiError(400, "'query' must be a string (and 'context', when given, a string).")
        model = s.model_of(body, "adapter") if "adapter" in body else s.assistant.names[0]
        s.check_prompt(query, context, "query")
        result = await s.answer(request, customer, query, context, model, s.max_tokens_of(body, "max_tokens"))
        row, grounded = result["row"], result["grounded"]
        intent = await run_in_threadpool(s.intents, row.text) if s.assistant.grounded(model) else None
        return JSONResponse(
            {
                "adapter": model,
                "query": query,
                **({"context": context} if context else {}),
                "response": grounded.response,
                "status": grounded.reason or "answered",
                "intent": intent,
                "complete": row.complete,
                "grounding": "banking" if s.assistant.grounded(model) else "none",
                **({"withheld_because": grounded.problems} if grounded.problems else {}),
            }
        )

    async def not_found(request, exc):
        return error_response(
            404,
            f"no endpoint {request.url.path}: see GET /v1/models, POST /v1/completions, "
            "POST /v1/chat/completions, POST /v1/banking/answer, GET /health, GET /metrics.",
        )

    async def method_not_allowed(request, exc: HTTPException):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}.", headers=exc.headers)

    @asynccontextmanager
    async def lifespan(app):
        s.batcher.start()
        yield
        s.batcher.stop(shutdown_timeout_s)

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", endpoint("models", models)),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/v1/banking/answer", endpoint("banking", banking_answer), methods=["POST"]),
    ]
    handlers = {404: not_found, 405: method_not_allowed}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def user_message(messages) -> str:
    """The question of a chat request: T5 reads one prompt, so one message with role "user"."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise ApiError(
            400,
            "'messages' must hold one message with role 'user': T5 reads one question, with no "
            "system prompt or earlier turns.",
        )
    message = messages[0]
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if message.get("role") != "user" or not isinstance(content, str) or set(message) - {"role", "content", "name"}:
        raise ApiError(400, '\'messages\' must hold one message {"role": "user", "content": TEXT}.')
    return content


def completion(kind: str, model: str, content: dict, row, prompt_tokens: int) -> JSONResponse:
    """OpenAI's completion ("text_completion") or chat completion ("chat.completion") of one choice."""
    choice = {"index": 0, **content, "finish_reason": "stop" if row.complete else "length", "logprobs": None}
    return JSONResponse(
        {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage(prompt_tokens, row.tokens),
        }
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_response(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    code = {404: "not_found", 413: "request_too_large", 503: "overloaded"}.get(status)
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
