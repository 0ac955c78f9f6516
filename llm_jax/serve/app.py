"""The HTTP side of `llm-jax serve`: a Starlette app speaking the OpenAI API over the batching engine.

Routes: GET / (the chat page), GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and
POST /v1/score for a reward model (which refuses the generation routes, as a language model refuses /v1/score).
Every error is a JSON body in the OpenAI format ({"error": {message, type, param, code}}). A request's choices
run as engine jobs; their tokens come back through an asyncio queue; a client that goes away (seen when a send
fails, or polled while waiting) has its jobs cancelled, which frees their slots at the engine's next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from llm_jax.errors import DataError
from llm_jax.serve import protocol
from llm_jax.serve.engine import Engine, Job
from llm_jax.inference.stream import Detokenizer
from llm_jax.serve.protocol import APIError, Generation, ModelInfo

MAX_BODY = 4 << 20  # bytes: far more than any context, far less than what could hurt the server
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class Served:
    """What the app serves: a language model's engine, or a reward model's scorer (exactly one of them)."""

    def __init__(self, info: ModelInfo, *, engine: Engine | None = None, stop_ids=frozenset(), scorer=None,
                 normaliser=None, api_key: str | None = None):
        self.info, self.engine, self.stop_ids, self.api_key = info, engine, frozenset(stop_ids), api_key
        self.scorer, self.normaliser = scorer, normaliser
        self.score_lock = asyncio.Lock()  # one scoring batch on the device at a time


def create_app(served: Served) -> Starlette:
    app = Starlette(routes=[
        Route("/", _page, methods=["GET"]), Route("/health", _health, methods=["GET"]),
        Route("/v1/models", _api(_models), methods=["GET"]),
        Route("/v1/completions", _api(_generation("completions")), methods=["POST"]),
        Route("/v1/chat/completions", _api(_generation("chat")), methods=["POST"]),
        Route("/v1/score", _api(_score), methods=["POST"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _crashed})
    app.state.served = served
    return app


def _api(handler):
    """An /v1/ endpoint: the API key checked, an APIError answered in the OpenAI format."""
    async def endpoint(request: Request):
        served = request.app.state.served
        try:
            _check_key(request, served.api_key)
            return await handler(request, served)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
    return endpoint


async def _page(request: Request):
    return HTMLResponse(resources.files("llm_jax.serve").joinpath("static/chat.html").read_text("utf-8"))


async def _health(request: Request):
    served = request.app.state.served
    if served.engine is None:
        return JSONResponse({"status": "ok", "model": served.info.name, "kind": "reward model"})
    active, queued = served.engine.load()
    return JSONResponse({"status": "ok" if served.engine.alive() else "engine stopped", "model": served.info.name,
                         "active": active, "queued": queued,
                         "slots": served.engine.batch, "context": served.info.context,
                         "ended": dict(served.engine.ended)})


async def _models(request: Request, served: Served):
    return JSONResponse({"object": "list", "data": [{"id": served.info.name, "object": "model", "created": 0,
                                                     "owned_by": "llm-jax", "max_model_len": served.info.context}]})


def _generation(kind: str):
    async def handler(request: Request, served: Served):
        if served.engine is None:
            raise APIError(400, f"'{served.info.name}' is a reward model: it serves POST /v1/score, not "
                           "generation", None, "wrong_model_kind")
        if not served.engine.alive():
            raise APIError(503, "the generation engine has stopped; restart the server", kind="server_error")
        gen = protocol.parse(kind, await _json(request), served.info)
        run = Run(served, gen, request)
        if gen.stream:
            return StreamingResponse(run.chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await run.whole())
    return handler


async def _score(request: Request, served: Served):
    if served.scorer is None:
        raise APIError(400, f"'{served.info.name}' is a language model: /v1/score needs a reward model", None,
                       "wrong_model_kind")
    body = await _json(request)
    if not isinstance(body, dict) or not isinstance(body.get("input"), list) or not body["input"]:
        raise APIError(400, "'input' must be a non-empty list of {prompt, response}, {messages}, "
                       "{prompt, chosen, rejected} or {chosen, rejected} objects", "input")
    protocol.check_model(body, served.info)
    from llm_jax.inference.score import parse_item, score_items
    try:
        items = [(i, parse_item(record, f"input[{i}]")) for i, record in enumerate(body["input"])]
    except DataError as e:
        raise APIError(400, str(e), "input") from None
    async with served.score_lock:
        lines, summary = await run_in_threadpool(score_items, served.scorer, served.info.tokenizer,
                                                 served.normaliser, items)
    for line in lines:
        line["index"] = line.pop("line")
    return JSONResponse({"object": "list", "model": served.info.name, "data": lines, "summary": summary})


async def _http_error(request: Request, exc: HTTPException):
    message = "no such route" if exc.status_code == 404 else exc.detail
    return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {message}").body(),
                        status_code=exc.status_code)


async def _crashed(request: Request, exc: Exception):
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                        status_code=500)


def _check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
        raise APIError(401, "Incorrect API key provided" if given else "No API key provided (Authorization: Bearer)",
                       None, "invalid_api_key")


async def _json(request: Request):
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


class Run:
    """One request's choices, as engine jobs whose events arrive on an asyncio queue."""

    def __init__(self, served: Served, gen: Generation, request: Request):
        self.served, self.gen, self.request = served, gen, request
        self.id = protocol.response_id(gen.kind)
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = secrets.randbits(32) if gen.seed is None else gen.seed % (1 << 32)
        self.jobs, self.texts = [], []
        for p, prompt in enumerate(gen.prompts):
            for c in range(gen.n):
                index = p * gen.n + c

                def on_event(token, finish, index=index):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, token, finish))
                self.jobs.append(Job(list(prompt), gen.max_tokens, on_event, served.stop_ids, gen.temperature,
                                     gen.top_k, gen.top_p, seed, stream=index))
                self.texts.append(Detokenizer(served.info.tokenizer, served.stop_ids, gen.stop))
        self.counts = [0] * len(self.jobs)
        for job in self.jobs:
            served.engine.submit(job)

    async def events(self):
        """(choice, new text, finish reason or None) until every choice is finished."""
        finished, checked = set(), time.monotonic()
        try:
            while len(finished) < len(self.jobs):
                # By the clock, not only when idle: tokens arrive every step, and a client that left must not
                # hold its slots until max_tokens (uvicorn does not cancel a handler whose client is gone).
                if time.monotonic() - checked > POLL_S:
                    if await self.request.is_disconnected():
                        return
                    checked = time.monotonic()
                try:
                    index, token, finish = await asyncio.wait_for(self.queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    continue
                if index in finished:
                    continue  # what a job stopped by a stop string produced before its cancel took effect
                if finish is not None and finish != "stop" and finish != "length":
                    raise APIError(503 if finish == "cancelled" else 500, "the server is shutting down"
                                   if finish == "cancelled" else f"generation failed: {finish[7:]}", kind="server_error")
                text = self.texts[index]
                if finish is None:
                    self.counts[index] += 1
                delta = text.add(token if finish is None else None)
                if text.stopped:
                    self.served.engine.cancel(self.jobs[index])
                    finish = "stop"
                if finish is not None:
                    finished.add(index)
                yield index, delta, finish
        finally:
            for job in self.jobs:
                self.served.engine.cancel(job)

    def usage(self) -> dict:
        """Completion tokens up to each choice's end (a stop string's included, nothing generated after it)."""
        return protocol.usage(sum(map(len, self.gen.prompts)), sum(self.counts))

    async def whole(self) -> dict:
        texts, finishes = [""] * len(self.jobs), [None] * len(self.jobs)
        async for index, delta, finish in self.events():
            texts[index] += delta
            finishes[index] = finish or finishes[index]
        kind = self.gen.kind
        return {**protocol.envelope(kind, self.id, self.served.info.name, chunk=False),
                "choices": [protocol.choice(kind, i, t, f, chunk=False) for i, (t, f) in enumerate(zip(texts, finishes))],
                "usage": self.usage()}

    async def chunks(self):
        kind, name = self.gen.kind, self.served.info.name
        started = set()
        try:
            async for index, delta, finish in self.events():
                if not delta and not finish and index in started:
                    continue
                chunk = {**protocol.envelope(kind, self.id, name, chunk=True),
                         "choices": [protocol.choice(kind, index, delta, finish, chunk=True,
                                                     first=index not in started)]}
                started.add(index)
                yield _sse(chunk)
            if self.gen.include_usage:
                yield _sse({**protocol.envelope(kind, self.id, name, chunk=True), "choices": [], "usage": self.usage()})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
