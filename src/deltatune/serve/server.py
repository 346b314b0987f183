"""The OpenAI-compatible HTTP server (FastAPI): the request's ``model`` names the adapter.

    POST /v1/completions        prompt → text          (stream: server-sent events)
    POST /v1/chat/completions   messages → message     (the tokenizer's chat template)
    GET  /v1/models             the base and every adapter in the store
    GET  /health, GET /metrics  liveness; Prometheus text
    POST /admin/load, /admin/unload   {"model": name}; need "Authorization: Bearer <api key>",
                                      and are off when the server has no key

Errors are OpenAI-style JSON bodies ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from deltatune.methods.base import BASE_ADAPTER
from deltatune.serve.engine import Engine, Event, GenRequest, QueueFull
from deltatune.serve.store import AdapterNotFound, check_name


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 429: "rate_limit_error"}  # fmt: skip


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ApiError(400, f"'{name}' must be of type {getattr(kind, '__name__', kind)}.", param=name)
    return value


class _Mailbox:
    """Events from the engine thread to the event loop, delivered in batches: a decode step emits
    one event per running request, and waking the loop (and handing it the interpreter lock)
    once per batch instead of once per event keeps the loop from slowing every step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], ev: Event) -> None:
        with self._lock:
            self._pending.append((queue, ev))
            if len(self._pending) > 1:
                return  # a flush is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, ev in items:
            queue.put_nowait(ev)


def create_app(engine: Engine, base_name: str, api_key: str | None = None) -> Any:
    app = FastAPI(title="deltatune serve")
    store = engine.store
    mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}  # one per serving loop

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        body = {"message": exc.message, "type": _TYPES.get(exc.status, "server_error"), "param": exc.param,
                "code": exc.code}  # fmt: skip
        return JSONResponse({"error": body}, status_code=exc.status, headers=headers)

    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def _adapter(body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the base's name or an adapter's name.", param="model")
        if model == base_name:
            return BASE_ADAPTER
        try:
            check_name(model)
        except ValueError as exc:
            raise ApiError(
                404, f"The model {model!r} does not exist: {exc}", param="model", code="model_not_found"
            ) from exc
        if not store.exists(model):
            raise ApiError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")
        return model

    def _gen(body: dict[str, Any], prompt_ids: list[int]) -> GenRequest:
        max_tokens = _field(body, "max_tokens", int, 16)
        if "max_completion_tokens" in body:
            max_tokens = _field(body, "max_completion_tokens", int, max_tokens)
        if max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be at least 1.", param="max_tokens")
        if len(prompt_ids) + max_tokens > engine.max_len:
            raise ApiError(
                400,
                f"The prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the limit of "
                f"{engine.max_len} tokens; shorten the prompt or lower max_tokens.",
                param="max_tokens" if len(prompt_ids) < engine.max_len else "prompt",
                code="context_length_exceeded",
            )
        temperature = float(_field(body, "temperature", (int, float), 1.0))
        top_p = float(_field(body, "top_p", (int, float), 1.0))
        if not 0 <= temperature <= 2:
            raise ApiError(400, "'temperature' must be between 0 and 2.", param="temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, "'top_p' must be in (0, 1].", param="top_p")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings.", param="stop")
        seed = _field(body, "seed", int, None)
        return GenRequest(adapter=_adapter(body), prompt_ids=prompt_ids, max_tokens=max_tokens,
                          temperature=temperature, top_p=top_p, stop=stop, seed=seed)  # fmt: skip

    async def _run(req: GenRequest) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(loop)
        if mailbox is None:
            mailbox = mailboxes[loop] = _Mailbox(loop)
        events: asyncio.Queue[Event] = asyncio.Queue()
        req.emit = lambda ev: mailbox.post(events, ev)
        try:
            engine.submit(req)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from exc
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev[0] in ("done", "error"):
                    return
        finally:
            req.cancelled = True  # a client gone mid-way frees its slot at the next step

    async def _respond(req: GenRequest, stream: bool, chat: bool, model: str) -> Any:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        events = _run(req)
        first = await events.__anext__()  # errors before any token become HTTP errors
        if first[0] == "error":
            status, message = first[1]
            raise ApiError(status, message, param="model" if status == 404 else None)

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            msg = {"role": "assistant", "content": text} if not delta or text else {}
            return {"index": 0, key: msg, "finish_reason": finish}

        if stream:

            async def sse() -> AsyncIterator[str]:
                ev: Event | None = first
                while ev is not None:
                    kind, data = ev
                    if kind == "text":
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                 "model": model, "choices": [choice(data, None, True)]}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                    elif kind == "done":
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                 "model": model, "choices": [choice("", data[0], True)]}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                    else:
                        yield f"data: {json.dumps({'error': {'message': data[1], 'type': 'server_error'}})}\n\n"
                    ev = await events.__anext__() if kind == "text" else None
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish, count = "", "stop", 0
        ev: Event | None = first
        while ev is not None:
            if ev[0] == "text":
                text += ev[1]
            elif ev[0] == "done":
                finish, count = ev[1]
            else:
                raise ApiError(ev[1][0], ev[1][1])
            ev = await events.__anext__() if ev[0] == "text" else None
        n_prompt = len(req.prompt_ids)
        return {"id": rid, "object": obj, "created": created, "model": model,
                "choices": [choice(text, finish, False)],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": count, "total_tokens": n_prompt + count}}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string.", param="prompt")
        ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        req = _gen(body, ids)
        return await _respond(req, bool(body.get("stream")), False, body["model"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json(request)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ApiError(
                400, "'messages' must be a non-empty list of {role, content} strings.", param="messages"
            )
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        req = _gen(body, list(ids))
        return await _respond(req, bool(body.get("stream")), True, body["model"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        names = [base_name, *store.available()]
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "deltatune",
             "root": base_name, "parent": None if n == base_name else base_name} for n in names]}  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = []
        for name, value in engine.metrics().items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def _admin(request: Request) -> None:
        if not api_key:
            raise ApiError(403, "Admin endpoints are off: start the server with --api-key to enable them.")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "Admin endpoints need 'Authorization: Bearer <api key>'.", code="invalid_api_key"
            )

    @app.post("/admin/load")
    async def admin_load(request: Request) -> dict[str, Any]:
        _admin(request)
        name = _adapter(await _json(request))
        try:
            await asyncio.to_thread(store.ensure, [name])
        except AdapterNotFound as exc:
            raise ApiError(404, f"The model {name!r} does not exist.", param="model") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), param="model") from exc
        return {"loaded": store.loaded}

    @app.post("/admin/unload")
    async def admin_unload(request: Request) -> dict[str, Any]:
        _admin(request)
        name = _adapter(await _json(request))
        await asyncio.to_thread(store.unload, name)
        return {"loaded": store.loaded}

    return app


class ServerThread:
    """Run ``app`` with uvicorn on 127.0.0.1 (port 0: a free one) in a thread; ``stop()`` ends it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("The HTTP server did not start.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()
