"""The server: one Starlette app with Pie's protocol (/v1/ws), the OpenAI-compatible API, /health
and /metrics, over one Engine. Requests of both kinds become inferlets on the same runtime.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from pie.server import capture
from pie.server.auth import Gate, TokenStore
from pie.server.metrics import Metrics
from pie.server.processes import ProcessTable
from pie.server.programs import ProgramStore
from pie.server.ws import Connection

log = logging.getLogger("pie.server")


@dataclass
class ServerOptions:
    home: Path  # $PIE_HOME: programs/ and auth.json live here
    max_upload_bytes: int = 4 * 1024 * 1024  # one program's source
    max_file_bytes: int = 64 * 1024 * 1024  # one transfer_file
    max_processes: int = 256  # running inferlets (WS processes and HTTP requests together)
    max_per_user: int = 64
    max_body_bytes: int = 8 * 1024 * 1024  # one HTTP request body
    trust_identity_header: bool = False
    drain_timeout_s: float = 30.0
    served_model_names: dict[str, str] = field(default_factory=dict)  # OpenAI model id -> engine model


class ServerState:
    def __init__(self, engine, options: ServerOptions) -> None:
        self.engine, self.options = engine, options
        self.programs = ProgramStore(options.home / "programs", options.max_upload_bytes)
        self.gate = Gate(TokenStore(options.home / "auth.json"), options.trust_identity_header)
        self.processes = ProcessTable(engine, options.max_processes, options.max_per_user)
        self.metrics = Metrics(self)
        self.max_upload_bytes = options.max_upload_bytes
        self.max_file_bytes = options.max_file_bytes
        self.healthy = True


def _peer(conn) -> str | None:
    return conn.client.host if conn.client else None


async def ws_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.pie
    user = state.gate.identify(websocket.headers, _peer(websocket))
    # a missing token is settled by an auth_by_token request; a wrong one is refused at the upgrade
    if user is None and websocket.headers.get("authorization"):
        await websocket.close(code=1008, reason="invalid token")  # before accept: HTTP 403
        return
    await websocket.accept()
    await Connection(websocket, state, user).serve()


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.pie
    if not state.engine.models:
        return JSONResponse({"status": "unhealthy", "reason": "no model is running"}, status_code=503)
    for name, rt in state.engine.models.items():
        dead = getattr(rt.scheduler, "_dead", None)  # set when the driver failed for good
        if dead is not None:
            return JSONResponse({"status": "unhealthy", "reason": f"model {name!r}: {dead}"}, status_code=503)
    if not state.processes.accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(state.engine.models)})


class AuthMiddleware:
    """Bearer/Basic tokens on every HTTP request except /health when auth is on; the user in scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state: ServerState = request.app.state.pie
        user = state.gate.identify(request.headers, _peer(request))
        if user is None and scope["path"] != "/health":
            from pie.server.openai_api import error_response

            resp = error_response(
                401,
                "a valid token is required: Authorization: Bearer <token> (pie auth add USER)",
                "invalid_api_key",
            )
            await resp(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


def build_app(engine, options: ServerOptions, *, start_engine: bool = True, on_ready=None) -> Starlette:
    from pie.server import openai_api

    state = ServerState(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        restore = capture.install()
        try:
            if start_engine:
                await engine.start()
            if not options.served_model_names:
                options.served_model_names.update({n: n for n in engine.models})
            if on_ready is not None:
                on_ready()
            yield
        finally:
            left = await state.processes.drain(options.drain_timeout_s)
            if left:
                log.warning("pie: %d processes were still running after the drain timeout; cancelled", left)
            if start_engine:
                await engine.shutdown()
            restore()

    routes = [
        WebSocketRoute("/v1/ws", ws_endpoint),
        Route("/health", health),
        Route("/metrics", state.metrics.endpoint),
        *openai_api.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(AuthMiddleware)])
    app.state.pie = state
    return app
