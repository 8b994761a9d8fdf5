"""OpenAI-compatible HTTP: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses.

Each request is an inferlet on the engine (a process in the server's table, so it counts against the
same limits and batches with every other inferlet): it fills one context, forks it n times when n > 1
(the prompt's pages are shared) and streams each choice's text through a queue to the response.
Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pie.errors import PieError
from pie.server.openai_format import ChatFormat, CompletionFormat, ResponsesFormat
from pie.server.openai_params import (
    ApiError,
    GenRequest,
    chat_request,
    completion_request,
    parse_json,
    responses_request,
)
from pie.server.processes import Busy

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    500: "server_error",
}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status)


class _Stream(StreamingResponse):
    """SSE that stops (and so cancels the request's inferlet) as soon as the client disconnects.

    Starlette relies on send() failing to notice a gone client under ASGI 2.4, but uvicorn's send()
    then returns silently: the generation would run to its end for nobody. Always listening for
    http.disconnect, as Starlette does for older ASGI versions, fixes that.
    """

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


# ---- running one request as an inferlet --------------------------------------------------------
class Run:
    """The events of one request's inferlet: ("delta", i, text), ("calls", i, tool_calls),
    ("done", i, reason, tokens, logprobs), ("prompt", n_tokens), ("error", exc) and ("end",)."""

    def __init__(self, state, req: GenRequest, engine_model: str, user: str, label: str) -> None:
        self.state, self.req, self.engine_model = state, req, engine_model
        self.q: asyncio.Queue = asyncio.Queue()
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.n_out = 0
        self.proc = state.processes.launch(user, label, self._main, {}, self._on_frame, model=engine_model)

    def _on_frame(self, frame: dict) -> None:
        if frame.get("event") in ("return", "error"):
            self.q.put_nowait(("end", frame["event"], frame["value"]))

    async def _main(self, _input: dict) -> None:
        try:
            await self._generate()
        except Exception as e:  # the handler answers with it (400 for bad input, else 500)
            self.q.put_nowait(("failed", e))
            raise

    async def _generate(self) -> None:
        if self.req.structured:
            from pie.server.openai_structured import generate_structured

            await generate_structured(self.req, self.engine_model, self.q.put_nowait, self._delta)
            return
        from pie.sdk import Context, Model, Sampler

        req = self.req
        model = Model.load(self.engine_model)
        tok = model.tokenizer
        if req.temperature == 0:
            sampler = Sampler.argmax()
        else:
            sampler = Sampler.top_p(req.top_p, t=req.temperature, seed=req.seed)
        if req.logprobs:
            sampler = sampler.with_logprobs()
        window = int(model.capabilities.extra.get("max_position_embeddings") or 1 << 30)

        async def choice(ctx, index: int, seed_offset: int) -> None:
            s = sampler if req.seed is None or seed_offset == 0 else sampler.with_seed(req.seed + seed_offset)
            gen = ctx.generate(
                s, max_tokens=req.max_tokens or window, stop=req.stop or None, ignore_eos=req.ignore_eos
            )
            async for chunk in gen:
                self._delta(index, chunk)
            self.q.put_nowait(("done", index, gen.finish_reason, list(gen.tokens), list(gen.logprobs)))

        for p_i, prompt in enumerate(req.prompts):
            base = Context(model)
            if req.chat:
                for role, text in prompt:
                    getattr(base, role)(text)
                base.cue()
            else:
                base.append(tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt])
            await base.flush()
            self.q.put_nowait(("prompt", len(base.tokens)))
            ctxs = [base] + [base.fork() for _ in range(req.n - 1)]
            await asyncio.gather(*(choice(c, p_i * req.n + j, j) for j, c in enumerate(ctxs)))
            for c in ctxs:
                c.close()

    def _delta(self, index: int, text: str) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now
        self.q.put_nowait(("delta", index, text))

    async def events(self) -> AsyncIterator[tuple]:
        """The run's events until it ends; raises ApiError for a failed run. Cancels it if abandoned."""
        try:
            while True:
                ev = await self.q.get()
                if ev[0] == "failed":
                    e = ev[1]
                    if isinstance(e, ApiError):  # a check that needed the model (openai_structured)
                        raise e
                    status = 400 if isinstance(e, (PieError, ValueError)) else 500
                    raise ApiError(status, f"generation failed: {type(e).__name__}: {e}")
                if ev[0] == "end":
                    if ev[1] == "error":
                        raise ApiError(500, f"generation failed: {ev[2].strip()}")
                    return
                if ev[0] == "done":
                    self.n_out += len(ev[3])
                if ev[0] == "prompt":
                    self.state.metrics.prompt_tokens.labels(self.req.model).inc(ev[1])
                yield ev
        finally:
            self.state.processes.terminate(self.proc)  # a no-op once it finished; cancels it otherwise
            m = self.state.metrics
            m.observe(self.req.model, self.t0, self.first, time.monotonic(), self.gaps, self.n_out)
            m.output_tokens.labels(self.req.model).inc(self.n_out)


# ---- endpoints -----------------------------------------------------------------------------------
async def _body(request: Request) -> dict:
    limit = request.app.state.pie.options.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return parse_json(bytes(body), limit)


def _engine_model(state, d: dict) -> tuple[str, str]:
    names = state.options.served_model_names
    model = d.get("model")
    if model is None and len(names) == 1:
        model = next(iter(names))
    if not isinstance(model, str) or model not in names:
        raise ApiError(
            404, f"the model {model!r} does not exist; served: {', '.join(names)}", "model", "model_not_found"
        )
    return model, names[model]


def _endpoint(kind: str):
    async def handler(request: Request) -> Response:
        state = request.app.state.pie
        try:
            d = await _body(request)
            model, engine_model = _engine_model(state, d)
            parse = {"chat": chat_request, "completion": completion_request, "responses": responses_request}[
                kind
            ]
            req = parse(d, model)
            user = request.scope.get("state", {}).get("user") or "local"
            run = Run(state, req, engine_model, user, f"openai:{request.url.path}")
        except ApiError as e:
            state.metrics.requests.labels(kind, str(e.status)).inc()
            return error_response(e.status, str(e), e.code, e.param)
        except Busy as e:
            state.metrics.requests.labels(kind, "429").inc()
            return error_response(429, str(e), "rate_limit_exceeded")
        except PieError as e:
            state.metrics.requests.labels(kind, "400").inc()
            return error_response(400, str(e))
        state.metrics.requests.labels(kind, "200").inc()
        tok = state.engine.model(engine_model).tokenizer
        fmt = {"chat": ChatFormat, "completion": CompletionFormat, "responses": ResponsesFormat}[kind](
            req, tok
        )
        if req.stream:
            return _Stream(_stream(run, fmt), media_type="text/event-stream")
        watch = asyncio.create_task(_cancel_on_disconnect(request, run))
        try:
            async for ev in run.events():
                fmt.add(ev)
        except ApiError as e:
            return error_response(e.status, str(e), e.code, e.param)
        finally:
            watch.cancel()
        return JSONResponse(fmt.final())

    return handler


async def _cancel_on_disconnect(request: Request, run: Run) -> None:
    """A non-streaming client that goes away cancels its inferlet (the body is read: the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.state.processes.terminate(run.proc)


async def _stream(run: Run, fmt) -> AsyncIterator[bytes]:
    try:
        for obj in fmt.start():
            yield _sse(obj)
        async for ev in run.events():
            for obj in fmt.chunks(ev):
                yield _sse(obj)
        for obj in fmt.end():
            yield _sse(obj)
        if fmt.done_marker:
            yield b"data: [DONE]\n\n"
    except ApiError as e:  # the stream has started: the error is the last event
        yield _sse(
            {
                "error": {
                    "message": str(e),
                    "type": _TYPES.get(e.status, "server_error"),
                    "param": None,
                    "code": None,
                }
            }
        )


async def list_models(request: Request) -> Response:
    state = request.app.state.pie
    created = int(time.time())
    data = [
        {"id": n, "object": "model", "created": created, "owned_by": "pie"}
        for n in state.options.served_model_names
    ]
    return JSONResponse({"object": "list", "data": data})


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", _endpoint("completion"), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint("chat"), methods=["POST"]),
        Route("/v1/responses", _endpoint("responses"), methods=["POST"]),
    ]
