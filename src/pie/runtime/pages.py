"""Reference-counted KV page allocation; the runtime (not the driver) owns it.

A page holds `page_size` tokens of KV for every layer on the driver. Each holder of a page
(a context, a forked context sharing a full page, a queued forward pass that writes to it)
owns one reference; a page returns to the free list when its count drops to zero.

Free pages are a LIFO stack so a freed page is handed out again first (its memory is warm),
and allocation order is deterministic: a fresh allocator hands out 0, 1, 2, ...
"""

from __future__ import annotations

import numpy as np

from pie.errors import PieError

DEFAULT_HINT = "raise max_num_kv_pages or gpu_mem_utilization in the model's [model.driver.options]"


class OutOfPagesError(PieError):
    """Not enough free KV pages for an allocation."""


class PageAllocator:
    """Hands out page ids in 0..num_pages-1.

    Invariants: refcount[i] == 0 exactly for the ids on the free stack; no id is on it twice.
    """

    def __init__(self, num_pages: int, hint: str = DEFAULT_HINT) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.hint = hint
        self._refcount = np.zeros(num_pages, dtype=np.int32)
        # stack top is the end: popping from the end hands out 0, 1, 2, ... on a fresh allocator
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    def alloc(self, n: int) -> np.ndarray:
        """n fresh pages, each with refcount 1, as an int32 array."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(
                f"out of KV pages: asked for {n}, {len(self._free)} of {self.num_pages} free; "
                f"end some contexts (ctx.close()) or {self.hint}"
            )
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        ids = np.array(self._free[-n:][::-1], dtype=np.int32)
        del self._free[-n:]
        self._refcount[ids] = 1
        return ids

    def incref(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if np.any(self._refcount[ids] <= 0):
            bad = ids[self._refcount[ids] <= 0]
            raise ValueError(f"incref of free page(s) {bad.tolist()}")
        np.add.at(self._refcount, ids, 1)

    def decref(self, ids) -> None:
        """Drop one reference per id (an id may appear several times); free those that reach 0."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        uniq, counts = np.unique(ids, return_counts=True)
        if np.any(self._refcount[uniq] < counts):
            bad = uniq[self._refcount[uniq] < counts]
            raise ValueError(f"decref below zero for page(s) {bad.tolist()} (double free)")
        np.subtract.at(self._refcount, ids, 1)
        # free in reverse first-seen order so a later alloc returns them in the caller's order
        _, first = np.unique(ids, return_index=True)
        order = ids[np.sort(first)]
        freed = order[self._refcount[order] == 0]
        self._free.extend(freed[::-1].tolist())

    free = decref
