"""`pie serve [-c CONFIG] [--host H] [--port P]`: Pie's client protocol and an OpenAI-compatible API.

    ws://H:P/v1/ws                 Pie's protocol (pie-client 0.5): install and launch inferlets
    http://H:P/v1/chat/completions, /v1/completions, /v1/responses, /v1/models   (OpenAI)
    http://H:P/health, /metrics    (Prometheus)

Loopback without authentication by default; any other address needs users (`pie auth add NAME`).
SIGTERM (or Ctrl-C) stops accepting, lets running inferlets finish for --drain-timeout seconds, cancels
the rest and exits 0. More: docs/serving.md.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pie.errors import PieError


class ServeError(PieError):
    exit_code = 2


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="serve Pie's client protocol and an OpenAI-compatible API",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-processes", type=int, default=256, help="running inferlets at most (default 256)")
    p.add_argument("--max-per-user", type=int, default=64, help="running inferlets per user (default 64)")
    p.add_argument(
        "--max-upload-bytes", type=int, default=4 << 20, help="largest program source (default 4 MiB)"
    )
    p.add_argument(
        "--max-file-bytes", type=int, default=64 << 20, help="largest transfer_file (default 64 MiB)"
    )
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest HTTP body (default 8 MiB)")
    p.add_argument(
        "--trust-identity-header",
        action="store_true",
        help="take the user from x-pie-identity (only behind a proxy that sets it and authenticates)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running work may finish on SIGTERM (default 30)",
    )
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # tests: no driver subprocess
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pie.config import load_or_default
    from pie.paths import pie_home
    from pie.runtime.engine import Engine
    from pie.server.app import ServerOptions, build_app
    from pie.server.auth import TokenStore, is_loopback

    home = pie_home()
    if not is_loopback(args.host) and not TokenStore(home / "auth.json").enabled():
        raise ServeError(
            f"refusing to listen on {args.host} without authentication: add a user first "
            "(`pie auth add NAME` prints their token), or bind 127.0.0.1"
        )
    if not 0 < args.port < 65536:
        raise ServeError(f"--port must be in 1..65535, got {args.port}")
    config, found = load_or_default(args.config)
    if not found:
        print(
            "pie: no config file; serving the default config (`pie config init` writes one)", file=sys.stderr
        )
    engine = Engine(config, in_process=args.in_process)
    options = ServerOptions(
        home=home,
        max_upload_bytes=args.max_upload_bytes,
        max_file_bytes=args.max_file_bytes,
        max_processes=args.max_processes,
        max_per_user=args.max_per_user,
        max_body_bytes=args.max_body_bytes,
        trust_identity_header=args.trust_identity_header,
        drain_timeout_s=args.drain_timeout,
    )
    ready = (
        f"pie: serving on http://{args.host}:{args.port} (Pie protocol: ws://{args.host}:{args.port}/v1/ws; "
        f"OpenAI API: http://{args.host}:{args.port}/v1)"
    )
    app = build_app(engine, options, on_ready=lambda: print(ready, file=sys.stderr, flush=True))
    state = app.state.pie

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:  # stop accepting, then let the work in flight finish
                server.close()
            left = await state.processes.drain(options.drain_timeout_s)
            if left:
                print(
                    f"pie: cancelled {left} inferlets still running after {args.drain_timeout}s",
                    file=sys.stderr,
                )
            await super().shutdown(sockets)

    ucfg = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws_max_size=2 * 1024 * 1024,  # a 256 KiB chunk and its frame; larger frames close the connection
        ws_ping_interval=20,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    # uvicorn re-raises the signal it stopped on; a no-op handler makes a drained SIGTERM exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = Server(ucfg)
    server.run()
    if not server.started:
        print("error: the server did not start (see above)", file=sys.stderr)
        return 1
    return 0
