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
import uuid
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pie.errors import PieError
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
    """The events of one request's inferlet: ("delta", i, text), ("done", i, reason, tokens, logprobs),
    ("prompt", n_tokens), ("error", exc) and ("end",)."""

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


def _logprobs_chat(tok, tokens: list[int], lps: list[float]) -> dict:
    out = []
    for t, lp in zip(tokens, lps, strict=False):
        s = tok.decode([t])
        out.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()), "top_logprobs": []})
    return {"content": out}


def _logprobs_completion(tok, tokens: list[int], lps: list[float]) -> dict:
    strs = [tok.decode([t]) for t in tokens]
    offsets, pos = [], 0
    for s in strs:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": strs,
        "token_logprobs": [float(x) for x in lps],
        "top_logprobs": None,
        "text_offset": offsets,
    }


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


class _Format:
    done_marker = True

    def __init__(self, req: GenRequest, tok) -> None:
        self.req, self.tok = req, tok
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        total = len(req.prompts) * req.n
        self.texts = [""] * total
        self.done: list[tuple | None] = [None] * total
        self.prompt_tokens = 0

    prefix = "x"

    def add(self, ev: tuple) -> None:
        if ev[0] == "delta":
            self.texts[ev[1]] += ev[2]
        elif ev[0] == "done":
            self.done[ev[1]] = ev
        elif ev[0] == "prompt":
            self.prompt_tokens += ev[1]

    def usage(self) -> dict:
        out = sum(len(d[3]) for d in self.done if d)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": out,
            "total_tokens": self.prompt_tokens + out,
        }

    def start(self) -> list:
        return []

    def end(self) -> list:
        return []


class ChatFormat(_Format):
    prefix = "chatcmpl"

    def _base(self, choices: list) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
        }

    def final(self) -> dict:
        choices = []
        for i, d in enumerate(self.done):
            lp = _logprobs_chat(self.tok, d[3], d[4]) if self.req.logprobs and d else None
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self.texts[i]},
                    "logprobs": lp,
                    "finish_reason": d[2] if d else "stop",
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def start(self) -> list:
        return [
            self._base(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.texts))
                ]
            )
        ]

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [
                self._base(
                    [{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}]
                )
            ]
        if ev[0] == "done":
            lp = _logprobs_chat(self.tok, ev[3], ev[4]) if self.req.logprobs else None
            return [self._base([{"index": ev[1], "delta": {}, "logprobs": lp, "finish_reason": ev[2]}])]
        return []

    def end(self) -> list:
        if not self.req.include_usage:
            return []
        return [self._base([]) | {"usage": self.usage()}]


class CompletionFormat(_Format):
    prefix = "cmpl"

    def _base(self, choices: list) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
        }

    def final(self) -> dict:
        choices = []
        for i, d in enumerate(self.done):
            lp = _logprobs_completion(self.tok, d[3], d[4]) if self.req.logprobs and d else None
            choices.append(
                {"index": i, "text": self.texts[i], "logprobs": lp, "finish_reason": d[2] if d else "stop"}
            )
        return self._base(choices) | {"usage": self.usage()}

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [self._base([{"index": ev[1], "text": ev[2], "logprobs": None, "finish_reason": None}])]
        if ev[0] == "done":
            lp = _logprobs_completion(self.tok, ev[3], ev[4]) if self.req.logprobs else None
            return [self._base([{"index": ev[1], "text": "", "logprobs": lp, "finish_reason": ev[2]}])]
        return []

    def end(self) -> list:
        return [self._base([]) | {"usage": self.usage()}] if self.req.include_usage else []


class ResponsesFormat(_Format):
    """The Responses API: one message output item with one output_text part."""

    prefix = "resp"
    done_marker = False

    def __init__(self, req: GenRequest, tok) -> None:
        super().__init__(req, tok)
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.seq = 0

    def _response(self, status: str) -> dict:
        d = self.done[0]
        text = self.texts[0]
        u = self.usage()
        item = {
            "type": "message",
            "id": self.msg_id,
            "status": "completed" if status == "completed" else "in_progress",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        incomplete = status == "completed" and d is not None and d[2] == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.req.model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [item] if status == "completed" else [],
            "error": None,
            "instructions": None,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "temperature": self.req.temperature,
            "top_p": self.req.top_p,
            "max_output_tokens": self.req.max_tokens,
            "metadata": {},
            "usage": {
                "input_tokens": u["prompt_tokens"],
                "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            if status == "completed"
            else None,
        }

    def final(self) -> dict:
        return self._response("completed")

    def _ev(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def start(self) -> list:
        item = {
            "type": "message",
            "id": self.msg_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._ev("response.created", response=self._response("in_progress")),
            self._ev("response.in_progress", response=self._response("in_progress")),
            self._ev("response.output_item.added", output_index=0, item=item),
            self._ev(
                "response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0, part=part
            ),
        ]

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [
                self._ev(
                    "response.output_text.delta",
                    item_id=self.msg_id,
                    output_index=0,
                    content_index=0,
                    delta=ev[2],
                    logprobs=[],
                )
            ]
        return []

    def end(self) -> list:
        final = self._response("completed")
        part = final["output"][0]["content"][0]
        return [
            self._ev(
                "response.output_text.done",
                item_id=self.msg_id,
                output_index=0,
                content_index=0,
                text=self.texts[0],
                logprobs=[],
            ),
            self._ev(
                "response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0, part=part
            ),
            self._ev("response.output_item.done", output_index=0, item=final["output"][0]),
            self._ev("response.completed", response=final),
        ]


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
