"""Named context snapshots, in memory and (with [runtime] snapshot_dir) on disk across runs.

In memory a snapshot holds references on its pages (kvcache.Snapshot). With a snapshot directory,
save() also writes the snapshot to `<dir>/<quoted name>.pie-kv` in the background, and a new run
lists those files at start and reads a file's pages back when it is first opened. A file is

    b"PIEKV1\\n" | u64 header length | header (JSON) | pages (num_pages x page_nbytes raw KV bytes)
        | recurrent state (state_nbytes raw bytes of the snapshot's state slot; hybrid models only)

and the header carries the driver's KV fingerprint (model, page size, KV dtype and layout): a
snapshot written by another model or page size is refused with a message naming both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pie.drivers.protocol import PageOps
from pie.runtime.kvcache import KVCache, Snapshot, SnapshotError
from pie.runtime.sequence import Sequence

if TYPE_CHECKING:
    from pie.runtime.scheduler import Scheduler

log = logging.getLogger(__name__)
MAGIC = b"PIEKV1\n"
SUFFIX = ".pie-kv"


class SnapshotStore:
    def __init__(
        self, kv: KVCache, scheduler: Scheduler, directory: str | Path | None, fingerprint: str
    ) -> None:
        self.kv = kv
        self.scheduler = scheduler
        self.dir = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self._on_disk: dict[str, Path] = {}  # snapshots of earlier runs, not loaded yet
        self._writes: set[asyncio.Task] = set()
        if self.dir is not None:
            self._scan()

    # ---- the SDK's operations ------------------------------------------------------------------
    def save(self, seq: Sequence, name: str | None) -> str:
        if name is not None and name in self._on_disk:
            raise SnapshotError(f"a snapshot named {name!r} already exists (on disk); delete it first")
        name = self.kv.save(seq, name)
        if self.dir is not None:
            task = asyncio.get_running_loop().create_task(self._write(name), name=f"pie-snapshot-{name}")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        return name

    def open(self, name: str) -> Sequence | None:
        self._load(name)
        seq = self.kv.open(name)
        return None if seq is None else self.scheduler.add_sequence(seq)

    def take(self, name: str) -> Sequence | None:
        self._load(name)
        seq = self.kv.take(name)
        if seq is None:
            return None
        self._unlink(name)
        return self.scheduler.add_sequence(seq)

    def delete(self, name: str) -> bool:
        found = self.kv.delete(name)
        if name in self._on_disk:
            del self._on_disk[name]
            found = True
        self._unlink(name)
        return found

    def names(self) -> list[str]:
        return sorted(set(self.kv.snapshots) | set(self._on_disk))

    async def flush(self) -> None:
        """Wait for snapshot files still being written (at shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # ---- disk ----------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        assert self.dir is not None
        return self.dir / (urllib.parse.quote(name, safe="") + SUFFIX)

    def _scan(self) -> None:
        assert self.dir is not None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"cannot create the snapshot directory {self.dir}: {e.strerror}") from None
        for f in sorted(self.dir.glob("*" + SUFFIX)):
            name = urllib.parse.unquote(f.name[: -len(SUFFIX)])
            self._on_disk[name] = f

    async def _write(self, name: str) -> None:
        snap = self.kv.snapshots.get(name)
        if snap is None:
            return
        data = np.zeros((0, 0), np.uint8)
        state = np.zeros((0, 0), np.uint8)
        if snap.pages or snap.state_slot >= 0:
            slots = [snap.state_slot] if snap.state_slot >= 0 else []
            ops = PageOps(read=np.asarray(snap.pages, np.int32), state_read=np.asarray(slots, np.int32))
            res = await self.scheduler.page_io(ops)
            if snap.pages:
                data = res.data
            if slots:
                state = res.state_data
        header = {
            "name": name,
            "fingerprint": self.fingerprint,
            "page_size": self.kv.ps,
            "tokens": snap.tokens,
            "positions": snap.positions,
            "hashes": snap.hashes,
            "causal_len": snap.causal_len,
            "kv_len": snap.kv_len,
            "num_pages": int(data.shape[0]),
            "page_nbytes": int(data.shape[1]) if data.ndim == 2 else 0,
            "state_nbytes": int(state.shape[1]) if state.shape[0] else 0,
        }
        path = self._path(name)
        tmp = path.with_suffix(".tmp")
        try:
            await asyncio.to_thread(_write_file, tmp, header, data, state)
            os.replace(tmp, path)
        except OSError as e:
            log.error("could not write snapshot %r to %s: %s", name, path, e)

    def _load(self, name: str) -> None:
        path = self._on_disk.get(name)
        if path is None or name in self.kv.snapshots:
            return
        header, data, state = _read_file(path)
        if header.get("fingerprint") != self.fingerprint:
            raise SnapshotError(
                f"snapshot {name!r} ({path}) was saved by another model or KV layout "
                f"({header.get('fingerprint')!r}); this engine runs {self.fingerprint!r}. Delete it or "
                "open it with the model and page size it was saved with"
            )
        del self._on_disk[name]
        snap = Snapshot(
            name, [], list(header["tokens"]), list(header["positions"]), list(header["hashes"]),
            int(header["causal_len"]), int(header["kv_len"]), disk_data=data if data.shape[0] else None,
            disk_state=state if state.shape[0] else None,
        )  # fmt: skip
        self.kv.add_disk_snapshot(snap)

    def _unlink(self, name: str) -> None:
        if self.dir is not None:
            try:
                self._path(name).unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove snapshot file of %r: %s", name, e)


def _write_file(path: Path, header: dict, data: np.ndarray, state: np.ndarray) -> None:
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        f.write(np.ascontiguousarray(data).tobytes())
        f.write(np.ascontiguousarray(state).tobytes())


def _read_file(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(header, pages [num_pages, page_nbytes], state [1 or 0, state_nbytes]) of a snapshot file."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise SnapshotError(f"{path} is not a pie snapshot file")
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            raw = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, ValueError, struct.error) as e:
        raise SnapshotError(f"cannot read snapshot file {path}: {e}") from None
    pages, nbytes = int(header["num_pages"]), int(header["page_nbytes"])
    state_nbytes = int(header.get("state_nbytes", 0))
    if raw.size != pages * nbytes + state_nbytes:
        raise SnapshotError(
            f"snapshot file {path} is truncated ({raw.size} of {pages * nbytes + state_nbytes} bytes)"
        )
    data = raw[: pages * nbytes].reshape(pages, nbytes).copy()
    state = raw[pages * nbytes :].reshape(1 if state_nbytes else 0, state_nbytes).copy()
    return header, data, state
