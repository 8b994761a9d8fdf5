"""Reference-counted KV page allocation; the runtime (not the driver) owns it.

A page holds `page_size` tokens of KV for every layer on the driver. Two kinds of holds keep a page
alive, and a page returns to the free list only when it has neither:

    refs[p]   owners: sequences (contexts), snapshots and the prefix cache that hold p in their page
              table. refs > 1 means p is shared, so nobody may write into it (copy-on-write first).
    pins[p]   forward passes queued or running that read or write p. A pin never makes a page shared;
              it only delays freeing, so a page dropped by its owner while a pass still uses it cannot
              be handed to another owner (who would write it in the same batch).

Free pages are a LIFO stack so a freed page is handed out again first (its memory is warm),
and allocation order is deterministic: a fresh allocator hands out 0, 1, 2, ...
"""

from __future__ import annotations

import numpy as np

from pie.errors import PieError

DEFAULT_HINT = "raise max_num_kv_pages or gpu_mem_utilization in the model's [model.driver.options]"


class OutOfPagesError(PieError):
    """Not enough KV pages for a context, even after preempting everything else."""


class PageAllocator:
    """Hands out page ids in 0..num_pages-1.

    Invariants: refs[i] == pins[i] == 0 exactly for the ids on the free stack; no id is on it twice.
    """

    def __init__(self, num_pages: int, hint: str = DEFAULT_HINT) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.hint = hint
        self._refs = np.zeros(num_pages, dtype=np.int32)
        self._pins = np.zeros(num_pages, dtype=np.int32)
        # stack top is the end: popping from the end hands out 0, 1, 2, ... on a fresh allocator
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def pincount(self, page: int) -> int:
        return int(self._pins[page])

    def is_shared(self, page: int) -> bool:
        return self._refs[page] > 1

    def alloc(self, n: int) -> list[int]:
        """n fresh pages, each with one reference (the caller's)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(
                f"out of KV pages: asked for {n}, {len(self._free)} of {self.num_pages} free"
            )
        if n == 0:
            return []
        ids = self._free[-n:][::-1]
        del self._free[-n:]
        self._refs[ids] = 1
        return ids

    def incref(self, ids) -> None:
        if isinstance(ids, list) and len(ids) == 1:  # one page (the prefix cache takes one at a time)
            p = ids[0]
            if self._refs[p] <= 0:
                raise ValueError(f"incref of unowned page(s) [{p}]")
            self._refs[p] += 1
            return
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if np.any(self._refs[ids] <= 0):
            bad = ids[self._refs[ids] <= 0]
            raise ValueError(f"incref of unowned page(s) {bad.tolist()}")
        np.add.at(self._refs, ids, 1)

    def decref(self, ids) -> None:
        """Drop one reference per id (an id may appear several times); free those left unheld."""
        self._drop(self._refs, ids, "decref")

    free = decref

    def pin(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size > 32:
            np.add.at(self._pins, ids, 1)
        else:  # small batches: numpy's ufunc.at costs more than the loop
            pins = self._pins
            for p in ids.tolist():
                pins[p] += 1

    def unpin(self, ids) -> None:
        self._drop(self._pins, ids, "unpin")

    def _drop(self, counts: np.ndarray, ids, what: str) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.size <= 32:  # small (a decode step's pages): a loop beats numpy's set operations
            lst = ids.tolist()
            if len(set(lst)) == len(lst):
                refs, pins = self._refs, self._pins
                if any(counts[p] < 1 for p in lst):
                    bad = [p for p in lst if counts[p] < 1]
                    raise ValueError(f"{what} below zero for page(s) {bad} (double free)")
                freed = []
                for p in lst:
                    counts[p] -= 1
                    if refs[p] == 0 and pins[p] == 0:
                        freed.append(p)
                self._free.extend(freed[::-1])
                return
        uniq, n = np.unique(ids, return_counts=True)
        if np.any(counts[uniq] < n):
            bad = uniq[counts[uniq] < n]
            raise ValueError(f"{what} below zero for page(s) {bad.tolist()} (double free)")
        np.subtract.at(counts, ids, 1)
        # free in reverse first-seen order so a later alloc returns them in the caller's order
        _, first = np.unique(ids, return_index=True)
        order = ids[np.sort(first)]
        freed = order[(self._refs[order] == 0) & (self._pins[order] == 0)]
        self._free.extend(freed[::-1].tolist())

    def check(self) -> None:
        """Assert the invariants (tests): free ids are exactly the unheld ones, each once."""
        free = np.zeros(self.num_pages, dtype=np.int32)
        np.add.at(free, np.asarray(self._free, dtype=np.int64), 1)
        unheld = (self._refs == 0) & (self._pins == 0)
        assert np.all(free <= 1), "a page is on the free list twice"
        assert np.array_equal(free == 1, unheld), "free list and counts disagree"
        assert np.all(self._refs >= 0) and np.all(self._pins >= 0)
