"""One client connection of Pie's protocol at /v1/ws.

Requests are handled in arrival order; process events and responses leave through one bounded
outbound queue drained by a writer task (a client that stops reading until the queue is full is
disconnected rather than letting the server's memory grow).
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from pie.errors import PieError
from pie.inferlets.loader import BUILTINS, load_inferlet
from pie.server import frames
from pie.server.frames import FrameError, Upload
from pie.server.processes import Busy
from pie.server.programs import ProgramError

log = logging.getLogger("pie.server")
MAX_OUTBOUND = 65_536  # frames queued for one client


class SlowClient(Exception):
    pass


class Connection:
    def __init__(self, ws: WebSocket, state, user: str | None) -> None:
        self.ws, self.state = ws, state
        self.user = user  # None: must authenticate first (auth_by_token)
        self.out: asyncio.Queue[dict | None] = asyncio.Queue(MAX_OUTBOUND)
        self.uploads: dict[str, Upload] = {}
        self.file_uploads: dict[tuple[str, str], Upload] = {}
        self.closed = False

    # ---- output ---------------------------------------------------------------------------------
    def send(self, frame: dict) -> None:
        if self.closed:
            return
        try:
            self.out.put_nowait(frame)
        except asyncio.QueueFull:
            self.closed = True
            log.warning("client of user %r stopped reading; closing its connection", self.user)
            self.out = asyncio.Queue()  # the writer wakes on the sentinel and closes
            self.out.put_nowait(None)

    def respond(self, corr_id: int, ok: bool, result: str) -> None:
        self.send(frames.response(corr_id, ok, result))

    async def _writer(self) -> None:
        while True:
            frame = await self.out.get()
            if frame is None:
                await self.ws.close(code=1008, reason="client too slow to read its events")
                return
            await self.ws.send_bytes(frames.encode(frame))

    # ---- loop -----------------------------------------------------------------------------------
    async def serve(self) -> None:
        writer = asyncio.create_task(self._writer())
        try:
            while not self.closed:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is None:
                    self.respond(0, False, "frames must be binary msgpack, not text")
                    continue
                try:
                    self.handle(frames.decode(data))
                except FrameError as e:
                    self.respond(e.corr_id, False, str(e))
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            self.state.processes.detach_listener(self.send)
            writer.cancel()

    def handle(self, msg: dict) -> None:
        kind, cid = msg["type"], msg.get("corr_id", 0)
        if self.user is None and kind not in ("auth_by_token", "ping"):
            if "corr_id" in msg:
                self.respond(
                    cid, False, "not authenticated: send auth_by_token first, or connect with a token"
                )
            return
        try:
            getattr(self, f"on_{kind}")(msg)
        except (FrameError, ProgramError, Busy) as e:
            if "corr_id" in msg:
                self.respond(cid, False, str(e))
        except PieError as e:
            if "corr_id" in msg:
                self.respond(cid, False, str(e))

    # ---- requests -------------------------------------------------------------------------------
    def on_ping(self, msg: dict) -> None:
        self.respond(msg["corr_id"], True, "pong")

    def on_auth_identify(self, msg: dict) -> None:
        name = msg["username"]
        if not self.state.gate.store.enabled() and not self.state.gate.trust_identity_header:
            # no authentication (loopback): the client names itself, as Pie's server allows then
            if name and name != self.user:
                self.state.processes.detach_listener(self.send)  # its processes were the old name's
                self.user = name
        elif name and name != self.user:
            self.respond(
                msg["corr_id"], False, f"authenticated as {self.user!r}; cannot identify as {name!r}"
            )
            return
        self.respond(msg["corr_id"], True, f"authenticated as {self.user}")

    def on_auth_by_token(self, msg: dict) -> None:
        user = self.state.gate.store.check(msg["token"])
        if user is None:
            self.respond(msg["corr_id"], False, "invalid token")
            return
        self.user = user
        self.respond(msg["corr_id"], True, f"authenticated as {user}")

    def on_query(self, msg: dict) -> None:
        if msg["subject"] != "model_status":
            raise FrameError(
                f"unknown query subject {msg['subject']!r} (known: model_status)", msg["corr_id"]
            )
        stats = {}
        for name, rt in self.state.engine.models.items():
            for k, v in rt.stats().items():
                stats[f"{name}.{k}"] = v
        self.respond(msg["corr_id"], True, json.dumps(stats))

    def on_check_program(self, msg: dict) -> None:
        exists = self.state.programs.exists(self.user, msg["name"], msg["version"])
        self.respond(msg["corr_id"], True, "true" if exists else "false")

    def on_add_program(self, msg: dict) -> None:
        key = msg["program_hash"]
        up = self.uploads.get(key)
        if up is None:
            if msg["chunk_index"] != 0:
                raise FrameError("add_program: the first chunk must have chunk_index 0", msg["corr_id"])
            if len(self.uploads) >= 4:
                raise FrameError("add_program: at most 4 uploads at once per connection", msg["corr_id"])
            up = self.uploads[key] = Upload(msg["total_chunks"], self.state.max_upload_bytes, "add_program")
        try:
            if not up.add(msg["chunk_index"], msg["total_chunks"], msg["chunk_data"]):
                return
            del self.uploads[key]
            source = up.check_hash(key)
        except FrameError:
            self.uploads.pop(key, None)
            raise
        m = self.state.programs.install(self.user, source, msg["manifest"], bool(msg.get("force_overwrite")))
        self.respond(msg["corr_id"], True, f"program {m.program} installed")

    def _resolve(self, spec: str):
        found = self.state.programs.resolve(self.user, spec)
        if found is not None:
            return found
        name = spec.partition("@")[0]
        if name in BUILTINS:
            return name, load_inferlet(name)
        installed = ", ".join(self.state.programs.list(self.user)) or "none"
        raise ProgramError(
            f"no program {spec!r}: built-ins are {', '.join(BUILTINS)}; installed for {self.user}: {installed}"
        )

    def on_launch_process(self, msg: dict) -> None:
        try:
            input = json.loads(msg["input"]) if msg["input"].strip() else {}
        except json.JSONDecodeError as e:
            raise FrameError(f"launch_process: input is not JSON: {e}", msg["corr_id"]) from None
        if not isinstance(input, dict):
            raise FrameError(
                f"launch_process: input must be a JSON object, got {type(input).__name__}", msg["corr_id"]
            )
        program, main = self._resolve(msg["inferlet"])
        capture = msg.get("capture_outputs", True)
        listener = self.send if capture else None
        # the response goes out before any event of the process: launch() only creates the task
        proc = self.state.processes.launch(self.user, program, main, input, listener)
        self.respond(msg["corr_id"], True, proc.id)

    def on_attach_process(self, msg: dict) -> None:
        proc = self.state.processes.get(msg["process_id"], self.user)
        if proc.listener is not None and proc.listener != self.send:
            raise FrameError("attach_process: another connection is attached to this process", msg["corr_id"])
        self.respond(msg["corr_id"], True, "process attached")
        proc.attach(self.send)
        if proc.finished_at is not None:
            self.state.processes.procs.pop(proc.id, None)

    def on_list_processes(self, msg: dict) -> None:
        procs = [p.stats() for p in self.state.processes.procs.values() if p.owner == self.user]
        self.respond(msg["corr_id"], True, json.dumps(procs))

    def on_terminate_process(self, msg: dict) -> None:
        proc = self.state.processes.get(msg["process_id"], self.user)
        self.state.processes.terminate(proc)
        self.respond(msg["corr_id"], True, "process terminated")

    def on_signal_process(self, msg: dict) -> None:
        # fire-and-forget in Pie's protocol: an error has no corr_id to answer, so it is logged
        try:
            proc = self.state.processes.get(msg["process_id"], self.user)
            proc.channel.messages.put_nowait(msg["message"])
        except (PieError, asyncio.QueueFull) as e:
            self._dropped("signal_process", e)

    def on_transfer_file(self, msg: dict) -> None:
        key = (msg["process_id"], msg["file_hash"])
        try:
            proc = self.state.processes.get(msg["process_id"], self.user)
            up = self.file_uploads.get(key)
            if up is None:
                if msg["chunk_index"] != 0 or len(self.file_uploads) >= 8:
                    raise FrameError("transfer_file: the first chunk must have chunk_index 0 (<= 8 at once)")
                up = self.file_uploads[key] = Upload(
                    msg["total_chunks"], self.state.max_file_bytes, "transfer_file"
                )
            if up.add(msg["chunk_index"], msg["total_chunks"], msg["chunk_data"]):
                del self.file_uploads[key]
                proc.channel.files.put_nowait(up.check_hash(msg["file_hash"]))
        except (PieError, asyncio.QueueFull) as e:
            self.file_uploads.pop(key, None)
            self._dropped("transfer_file", e)

    def _dropped(self, what: str, e: Exception) -> None:
        """A fire-and-forget request failed: corr_id 0 carries the reason (the client ignores it)."""
        why = str(e) or "the process's inbox is full"
        log.info("%s from %r dropped: %s", what, self.user, why)
        self.respond(0, False, f"{what} dropped: {why}")
