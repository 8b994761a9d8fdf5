"""KV page movements (protocol.PageOps) on the executor's per-layer KV tensors: device copies, a host swap
pool, raw page bytes in and out.

Byte layout. Layer l's cache is a tensor [P, 2, page_size, Hkv_l, D_l] (P = num_pages, plus a scratch page
with CUDA graphs; layers may differ in heads and head dim). Viewed as uint8 it is [P, nbytes_l], one page
per row. A page's raw bytes are the concatenation over layers, which is also the host pool's row format:

    | layer 0 page (nbytes_0) | layer 1 page (nbytes_1) | ... |        page_nbytes = sum_l nbytes_l

Transfers. The pool is one uint8 tensor [num_swap_slots, page_nbytes], page-locked with cudaHostRegister on
CUDA (torch's pinned allocator would round a 40 GiB pool up to 64 GiB), so its rows are DMA targets. Slots
are arbitrary, so a swap gathers its pages into a device staging buffer [k, page_nbytes] (one gather per
layer) and moves each run of consecutive slots with one async copy (one per page at worst: pages are
~100 KiB to MBs, so the copy, not its launch, dominates). Swap-in is the mirror image.

Ordering. Everything is enqueued on the device's current stream, the one forward passes run on, so each step
sees the previous ones and the next forward sees all of them; no host sync is needed except where the host
reads bytes (read), which blocks until they have arrived. The host never touches pool rows itself on CUDA
(only the DMA engine does), so a swap_out followed by a swap_in of the same slot is ordered by the stream.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pie.drivers.kv_plan import GiB, MiB, host_available_bytes
from pie.drivers.protocol import PageOps, PageOpsResult
from pie.errors import DriverError

log = logging.getLogger(__name__)

# Bound on the device staging buffer of one swap / read / write chunk: the KV cache already holds most of the
# device memory, so transfers of many pages go in chunks of at most this many bytes.
STAGING_BYTES = 64 * MiB


# Gathers and scatters move whole rows, so they run on the widest integer "word" that divides every layer's
# page size: per-element index kernels on uint8 are several times slower than on int64 (CPU and CUDA).
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def byte_rows(kv: torch.Tensor) -> torch.Tensor:
    """[P, ...] layer cache -> [P, nbytes] uint8 view of the same memory (writes go through)."""
    try:
        return kv.view(torch.uint8).view(kv.shape[0], -1)
    except RuntimeError as e:
        raise DriverError(f"KV cache layer of shape {list(kv.shape)} is not contiguous per page: {e}") from e


def word_for(sizes: list[int]) -> tuple[int, torch.dtype]:
    """(bytes, dtype) of the widest word dividing every size."""
    return next((w, dt) for w, dt in _WORDS if all(n % w == 0 for n in sizes))


class HostSwapPool:
    """[num_slots, page_nbytes] uint8 host rows; page-locked on CUDA so copies to and from it are real DMA."""

    def __init__(self, num_slots: int, page_nbytes: int, device: torch.device) -> None:
        nbytes = num_slots * page_nbytes
        available = host_available_bytes()
        if nbytes > available:
            raise DriverError(
                f"the KV swap pool needs {nbytes / GiB:.2f} GiB of host memory ({num_slots} slots of "
                f"{page_nbytes} bytes) but {available / GiB:.2f} GiB are available; lower swap_pool_size "
                "(cuda_native) or cpu_mem_budget_in_gb (dev)"
            )
        try:
            self.rows = torch.empty((num_slots, page_nbytes), dtype=torch.uint8)
        except RuntimeError as e:
            raise DriverError(f"cannot allocate the KV swap pool ({nbytes / GiB:.2f} GiB): {e}") from None
        self.device = device
        self.pinned = False
        if device.type == "cuda" and nbytes:
            t0 = time.perf_counter()
            err = int(torch.cuda.cudart().cudaHostRegister(self.rows.data_ptr(), nbytes, 0))
            if err:
                log.warning("cudaHostRegister of the %.2f GiB swap pool failed (cudaError %d); swaps will "
                            "use pageable memory (slower)", nbytes / GiB, err)  # fmt: skip
            else:
                self.pinned = True
                log.info("swap pool: %d slots, %.2f GiB pinned in %.1f s", num_slots, nbytes / GiB,
                         time.perf_counter() - t0)  # fmt: skip

    def close(self) -> None:
        """Unpin (after the device is done with every queued copy). Idempotent."""
        if self.pinned:
            self.pinned = False
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.rows.data_ptr())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def slot_runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """[(i0, i1)] index ranges of `slots` (sorted) whose values are consecutive: slots[i0:i1] == s0..s0+n-1."""
    if slots.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    bounds = [0, *breaks.tolist(), int(slots.size)]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


class PageMover:
    """Applies PageOps to per-layer KV tensors and an optional host swap pool (see the module docstring)."""

    def __init__(self, kv_caches: list[torch.Tensor], num_swap_slots: int, device: torch.device) -> None:
        self.device = device
        rows = [byte_rows(kv) for kv in kv_caches]  # [P, nbytes_l] uint8 views
        sizes = [int(r.shape[1]) for r in rows]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()  # [L+1] bytes
        self.page_nbytes = int(self.offsets[-1])
        self.word, self.word_dtype = word_for(sizes)
        self.layers = [r.view(self.word_dtype) for r in rows]  # [P, nbytes_l / word] views
        self.word_offsets = [o // self.word for o in self.offsets]  # [L+1] in words
        if num_swap_slots < 0:
            raise DriverError(f"swap_slots must be >= 0, got {num_swap_slots}")
        self.num_swap_slots = num_swap_slots
        self.pool = HostSwapPool(num_swap_slots, self.page_nbytes, device) if num_swap_slots else None
        self.chunk = max(1, STAGING_BYTES // max(1, self.page_nbytes))  # pages per staging chunk

    # ---- whole pages as byte rows, on the device ---------------------------------------------------

    def gather(self, pages: torch.Tensor) -> torch.Tensor:
        """pages [k] int64 (device) -> their raw bytes [k, page_nbytes] uint8 on the device."""
        out = torch.empty((pages.shape[0], self.page_nbytes), dtype=torch.uint8, device=self.device)
        words = out.view(self.word_dtype)  # [k, page_nbytes / word]
        for rows, lo, hi in zip(self.layers, self.word_offsets[:-1], self.word_offsets[1:], strict=True):
            words[:, lo:hi] = rows[pages]
        return out

    def scatter(self, pages: torch.Tensor, data: torch.Tensor) -> None:
        """Write raw bytes data [k, page_nbytes] uint8 (device, contiguous) into pages [k] int64 (device)."""
        words = data.view(self.word_dtype)
        for rows, lo, hi in zip(self.layers, self.word_offsets[:-1], self.word_offsets[1:], strict=True):
            rows.index_copy_(0, pages, words[:, lo:hi])

    def _index(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device, non_blocking=True)

    # ---- the five steps ---------------------------------------------------------------------------

    def apply(self, ops: PageOps) -> PageOpsResult:
        """Run the steps in PageOps order; `ops` must have passed ops.validate()."""
        if len(ops.swap_out):
            self.swap_out(ops.swap_out[:, 0], ops.swap_out[:, 1])
        if len(ops.copy):
            self.copy(ops.copy[:, 0], ops.copy[:, 1])
        if len(ops.swap_in):
            self.swap_in(ops.swap_in[:, 0], ops.swap_in[:, 1])
        if len(ops.write):
            self.write(ops.write, ops.write_data)
        return PageOpsResult(data=self.read(ops.read) if len(ops.read) else None)

    def copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Device pages src[i] -> dst[i], every layer; all sources are read before any destination is written."""
        s, d = self._index(src), self._index(dst)
        for rows in self.layers:
            rows.index_copy_(0, d, rows[s])  # [C, nbytes_l] temporary per layer

    def swap_out(self, pages: np.ndarray, slots: np.ndarray) -> None:
        """Device pages -> host pool slots (async on CUDA; ordered before later work on the stream)."""
        order = np.argsort(slots, kind="stable")
        pages, slots = pages[order], slots[order]
        for c0 in range(0, len(slots), self.chunk):
            cs = slots[c0 : c0 + self.chunk]
            staged = self.gather(self._index(pages[c0 : c0 + self.chunk]))  # [k, page_nbytes]
            for i0, i1 in slot_runs(cs):
                s0 = int(cs[i0])
                self.pool.rows[s0 : s0 + i1 - i0].copy_(staged[i0:i1], non_blocking=True)

    def swap_in(self, slots: np.ndarray, pages: np.ndarray) -> None:
        """Host pool slots -> device pages (async on CUDA)."""
        order = np.argsort(slots, kind="stable")
        slots, pages = slots[order], pages[order]
        for c0 in range(0, len(slots), self.chunk):
            cs = slots[c0 : c0 + self.chunk]
            staged = torch.empty((len(cs), self.page_nbytes), dtype=torch.uint8, device=self.device)
            for i0, i1 in slot_runs(cs):
                s0 = int(cs[i0])
                staged[i0:i1].copy_(self.pool.rows[s0 : s0 + i1 - i0], non_blocking=True)
            self.scatter(self._index(pages[c0 : c0 + self.chunk]), staged)

    def write(self, pages: np.ndarray, data: np.ndarray) -> None:
        """Raw bytes data [W, page_nbytes] uint8 (host) -> device pages."""
        for c0 in range(0, len(pages), self.chunk):
            # from pageable numpy memory: a blocking upload, so `data` may be freed when this returns
            rows = torch.from_numpy(np.ascontiguousarray(data[c0 : c0 + self.chunk])).to(self.device)
            self.scatter(self._index(pages[c0 : c0 + self.chunk]), rows)

    def read(self, pages: np.ndarray) -> np.ndarray:
        """Device pages -> their raw bytes [R, page_nbytes] uint8 (host); blocks until they have arrived."""
        out = np.empty((len(pages), self.page_nbytes), dtype=np.uint8)
        host = torch.from_numpy(out)
        for c0 in range(0, len(pages), self.chunk):
            staged = self.gather(self._index(pages[c0 : c0 + self.chunk]))
            host[c0 : c0 + staged.shape[0]].copy_(staged)  # blocking device -> host
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
