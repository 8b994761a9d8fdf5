"""One model's KV memory as the runtime manages it: sequences' page tables, copy-on-write forks,
named snapshots, the automatic prefix cache, and the page movements (copies, swaps) they need.

Page movements are queued in `ops` and sent to the driver by the scheduler before its next batch;
the driver applies them in submission order with the batches, so a copy queued now reads what every
earlier batch wrote and is done before any later batch reads it.

Prefix cache. Each full page of a sequence's causal prefix gets a key chained over the pages before it:

    key_i = hash((key_{i-1}, tokens of page i, positions of page i))

(the KV of a page computed with causal attention is a function of exactly these). When a page's
batch has finished, the cache takes a reference on it under its key. A new pass whose prefix keys
match takes those pages instead of prefilling them. Cached pages nobody else holds are evicted
least-recently-used first, only when memory is needed.

Recurrent state (hybrid models, Qwen 3.5). The driver keeps each sequence's recurrent state in a slot of
its state pool; a sequence (or snapshot) holds one slot (Sequence.state_slot). Fork, save and open copy
the slot (a state_copy op), disk snapshots read and write its bytes; a sequence dropped for recompute lets
its slot go, and its next pass, starting again at token 0, rebuilds the state. Without a free slot, a
fork or an open gets the tokens only and recomputes them. The prefix cache is off for these models: a
cached page holds keys and values, but continuing after it would also need the recurrent state of exactly
that prefix, which nothing keeps. A computed token cannot be truncated away (the state cannot be rewound).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pie.drivers.protocol import PageOps
from pie.errors import PieError
from pie.runtime.pages import PageAllocator
from pie.runtime.sequence import DROPPED, RESIDENT, SWAPPED, Sequence

_ROOT = 0x5EED  # key of the empty prefix


class SnapshotError(PieError):
    """A snapshot that does not exist, already exists, or cannot be used here."""


@dataclass
class Snapshot:
    name: str
    pages: list[int]  # the snapshot holds one reference on each
    tokens: list[int]
    positions: list[int]
    hashes: list[int]
    causal_len: int
    kv_len: int  # tokens[:kv_len] are in the pages; the rest are computed by the first pass after open
    disk_data: np.ndarray | None = None  # [num_pages, page_nbytes] uint8 when loaded from disk, not resident
    state_slot: int = -1  # hybrid models: the state-pool slot holding the state of tokens[:kv_len]
    disk_state: np.ndarray | None = None  # [1, state_nbytes] uint8 when loaded from disk, not resident


@dataclass
class KVStats:
    tokens_prefilled: int = 0  # tokens run through the model (prompt, recompute; not decode steps)
    tokens_decoded: int = 0
    prefix_tokens_reused: int = 0  # tokens taken from shared (cached) pages instead of computed
    preemptions: int = 0
    preempted_recompute: int = 0
    pages_swapped_out: int = 0
    pages_swapped_in: int = 0
    pages_copied: int = 0
    pages_evicted: int = 0
    pages_released: int = 0  # pages freed because they left every layer's sliding window


@dataclass
class _PendingOps:
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    copy: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    write: list[int] = field(default_factory=list)
    write_data: list[np.ndarray] = field(default_factory=list)
    copy_src: dict[int, int] = field(default_factory=dict)  # dst -> src of the copies above
    state_copy: list[tuple[int, int]] = field(default_factory=list)  # (src slot, dst slot)
    state_write: list[int] = field(default_factory=list)
    state_write_data: list[np.ndarray] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.swap_out or self.copy or self.swap_in or self.write or self.state_copy or self.state_write
        )

    def state_written(self) -> set[int]:
        """State slots this group writes (its copies run, reading every source, before its writes)."""
        return {d for _, d in self.state_copy} | set(self.state_write)

    def written_after_copies(self) -> set[int]:
        """Device pages this group writes after its copies read them (swap_in, write)."""
        return {p for _, p in self.swap_in} | set(self.write)

    def blocks_swap_out(self, page: int, slot: int) -> bool:
        """A swap-out runs first in a group: it must not read a page the group writes, nor write a
        slot the group's swap-ins still read."""
        return (
            page in self.written_after_copies()
            or page in self.copy_src
            or any(s == slot for s, _ in self.swap_in)
            or any(s == slot for _, s in self.swap_out)  # the slot was freed and handed out again
        )

    def to_ops(self) -> PageOps:
        return PageOps(
            swap_out=np.asarray(self.swap_out, np.int32).reshape(-1, 2),
            copy=np.asarray(self.copy, np.int32).reshape(-1, 2),
            swap_in=np.asarray(self.swap_in, np.int32).reshape(-1, 2),
            write=np.asarray(self.write, np.int32),
            write_data=np.concatenate(self.write_data) if self.write_data else None,
            state_copy=np.asarray(self.state_copy, np.int32).reshape(-1, 2),
            state_write=np.asarray(self.state_write, np.int32),
            state_write_data=np.concatenate(self.state_write_data) if self.state_write_data else None,
        )


class KVCache:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        num_swap_slots: int = 0,
        window: int | None = None,
        num_state_slots: int = 0,
    ) -> None:
        self.alloc = allocator
        self.ps = page_size
        # Models whose every layer slides (window W): a page whose slots all lie W or more before the next
        # query is never read again. It is freed and its page-table entry points at `hole`, one page held
        # here for ever (attention masks it out; its content is never read for a result). The prefix
        # cache is off for such models: a cached prefix would need pages that were freed.
        self.window = window
        self.hole = allocator.alloc(1)[0] if window else None
        self.stats = KVStats()
        self.snapshots: dict[str, Snapshot] = {}
        self._cache: OrderedDict[int, int] = OrderedDict()  # key -> page, oldest use first
        self._cached_pages: dict[int, int] = {}  # page -> its key
        self._groups: list[_PendingOps] = [_PendingOps()]
        self._free_slots = list(range(num_swap_slots - 1, -1, -1))
        self.num_swap_slots = num_swap_slots
        self._ids = itertools.count(1)
        self._anon = itertools.count(1)
        # hybrid models: the driver's recurrent-state slots (see the module docstring)
        self.num_state_slots = num_state_slots
        self._free_state = list(range(num_state_slots - 1, -1, -1))

    @property
    def recurrent(self) -> bool:
        """The model keeps per-sequence recurrent state (a hybrid model)."""
        return self.num_state_slots > 0

    @property
    def num_free_state_slots(self) -> int:
        return len(self._free_state)

    # ---- recurrent-state slots ------------------------------------------------------------------
    def take_state_slot(self, seq: Sequence) -> bool:
        """Give seq a state slot (its state then covers nothing yet); False when none is free."""
        if seq.state_slot >= 0:
            return True
        if not self._free_state:
            return False
        seq.state_slot, seq.state_len = self._free_state.pop(), 0
        return True

    def _free_state_slot(self, holder: Sequence | Snapshot) -> None:
        if holder.state_slot >= 0:
            self._free_state.append(holder.state_slot)
            holder.state_slot = -1
        if isinstance(holder, Sequence):
            holder.state_len = 0

    def has_state(self, seq: Sequence) -> bool:
        """seq's slot holds the recurrent state of exactly its computed tokens (it may continue)."""
        return seq.state_slot >= 0 and seq.state_len == seq.kv_len

    def _copy_state(self, src: int, dst: int) -> None:
        g = self._groups[-1]
        if src in g.state_written() or dst in g.state_written():
            g = _PendingOps()
            self._groups.append(g)
        g.state_copy.append((src, dst))

    def _write_state(self, slot: int, data: np.ndarray) -> None:
        g = self._groups[-1]
        if slot in g.state_written():
            g = _PendingOps()
            self._groups.append(g)
        g.state_write.append(slot)
        g.state_write_data.append(data)

    # ---- sequences ----------------------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        return Sequence(next(self._ids))

    def release_outside_window(self, seq: Sequence, end: int) -> None:
        """Free seq's pages that no query after slot `end` - 1 can see (models whose every layer slides)."""
        limit = min((end - self.window + 1) // self.ps, len(seq.pages))  # type: ignore[operator]
        if limit <= seq.released or seq.state != RESIDENT:
            return
        hole, pages = self.hole, seq.pages
        freed = [p for p in pages[seq.released : limit] if p != hole]
        self.alloc.decref(freed)
        self.alloc.incref(np.full(limit - seq.released, hole))
        pages[seq.released : limit] = [hole] * (limit - seq.released)
        seq.released = limit
        self.stats.pages_released += len(freed)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's pages (pins keep those still used by a batch alive until it ends)."""
        if seq.closed:
            return
        seq.closed = True
        self._drop_pages(seq)

    def _drop_pages(self, seq: Sequence) -> None:
        if seq.state == SWAPPED:
            assert seq.swap_slots is not None
            self._free_slots.extend(s for s in seq.swap_slots if s >= 0)
            self.alloc.decref([p for p in seq.pages if p >= 0])
            seq.swap_slots = None
        else:
            self.alloc.decref(seq.pages)
        seq.pages = []
        seq.kv_len = 0
        seq.released = 0
        seq.state = RESIDENT
        self._free_state_slot(seq)

    def fork(self, seq: Sequence) -> Sequence:
        """A sequence with the same KV: full pages shared, the partial last page copied on the device."""
        self._require_idle(seq, "fork")
        child = self.new_sequence()
        self._share_into(child, seq)
        return child

    def _share_into(self, dst: Sequence, src: Sequence | Snapshot) -> None:
        """dst takes src's KV, every page by reference (copy-on-write: the partial last page is copied on
        the device by the first pass that writes into it).
        Tokens past src's computed KV (after a failed pass or a preemption) are copied as tokens only:
        dst computes them with its next pass."""
        if isinstance(src, Sequence) and src.state == SWAPPED and not self.ensure_resident(src):
            raise PieError("out of KV pages: cannot bring a swapped-out context back to copy it; retry later")
        kv = src.kv_len if isinstance(src, Sequence) else src.kv_len
        dst.tokens, dst.positions = list(src.tokens), list(src.positions)
        dst.causal_len = min(src.causal_len, kv)
        dst.state = RESIDENT
        if isinstance(src, Sequence) and src.state == DROPPED:  # nothing resident: the copy recomputes too
            kv = 0
        if self.recurrent and kv:
            # the recurrent state comes along in a slot of dst's own, or dst recomputes everything
            usable = src.state_slot >= 0 and (not isinstance(src, Sequence) or self.has_state(src))
            if usable and self.take_state_slot(dst):
                self._copy_state(src.state_slot, dst.state_slot)
                dst.state_len = kv
            else:
                kv = 0
                dst.causal_len = 0
        full = kv // self.ps
        # the partial last page is shared too: whoever writes into it first copies it (Scheduler._cow)
        dst.pages = list(src.pages[: -(-kv // self.ps)])
        self.alloc.incref(dst.pages)
        dst.hashes = list(src.hashes[:full])
        dst.kv_len = kv
        dst.released = 0
        while (
            self.hole is not None and dst.released < len(dst.pages) and dst.pages[dst.released] == self.hole
        ):
            dst.released += 1

    def truncate(self, seq: Sequence, n: int, recompute: bool = False) -> None:
        """Drop the last n tokens of the KV (e.g. rejected speculative drafts).

        Hybrid models cannot rewind their recurrent state: dropping computed tokens fails (PieError), or
        with `recompute` (the runtime's own rewinds) drops the whole KV to be recomputed by the next pass."""
        self._require_idle(seq, "truncate")
        if not 0 <= n <= seq.num_tokens:
            raise ValueError(f"cannot truncate {n} tokens of a context holding {seq.num_tokens}")
        if n == 0:
            return
        if self.recurrent and seq.num_tokens - n < seq.kv_len:
            if not recompute:
                raise PieError(
                    f"this model has recurrent layers whose state cannot be rewound: truncate can only drop "
                    f"tokens not computed yet (the last {seq.num_tokens - seq.kv_len}), not {n}; save a "
                    "snapshot before the tokens you may want to drop, and open it instead of truncating"
                )
            self.drop(seq)  # the next pass recomputes the kept tokens, rebuilding the state
            self.stats.preemptions -= 1  # not a preemption
        if seq.released:  # slots the kept tokens still need may have left the window: recompute them all
            self.drop(seq)
            self.stats.preemptions -= 1  # not a preemption
        self.ensure_resident(seq)  # may stay swapped when memory is short: then pages -1 are host slots
        keep = seq.num_tokens - n
        keep_pages = -(-keep // self.ps)
        dropped = seq.pages[keep_pages:]
        self.alloc.decref([p for p in dropped if p >= 0])
        if seq.state == SWAPPED:
            assert seq.swap_slots is not None
            self._free_slots.extend(s for s in seq.swap_slots[keep_pages:] if s >= 0)
            del seq.swap_slots[keep_pages:]
        del seq.pages[keep_pages:]
        del seq.tokens[keep:], seq.positions[keep:]
        del seq.hashes[keep // self.ps :]
        seq.kv_len = min(seq.kv_len, keep)
        seq.causal_len = min(seq.causal_len, keep)
        if keep % self.ps and len(seq.pages) == keep_pages and seq.pages[-1] >= 0:
            self._uncache_if_only_holder(seq.pages[-1])
        if (
            keep % self.ps
            and len(seq.pages) == keep_pages
            and seq.pages[-1] >= 0
            and self.alloc.pincount(seq.pages[-1])
        ):
            # a batch of another (released) context may still read the slots we will write again: copy
            # now. A page shared with owners is copied when first written (Scheduler._cow).
            self.cow(seq, len(seq.pages) - 1)

    def _uncache_if_only_holder(self, p: int) -> None:
        """A page about to be written again whose only other holder is the prefix cache leaves the cache
        (its key would no longer describe it) instead of being copied."""
        if p in self._cached_pages and self.alloc.refcount(p) == 2:
            del self._cache[self._cached_pages[p]]
            self._cached_pages.pop(p, None)
            self.alloc.decref([p])

    def cow(self, seq: Sequence, index: int) -> None:
        """Give seq its own copy of its page `index` (a device copy queued before the next batch)."""
        old = seq.pages[index]
        q = self.alloc_pages(1)[0]
        self._copy(old, q)
        self.stats.pages_copied += 1
        self.alloc.decref([old])
        seq.pages[index] = q

    # ---- snapshots ----------------------------------------------------------------------------
    def save(self, seq: Sequence, name: str | None = None) -> str:
        self._require_idle(seq, "save")
        if name is None:
            name = f"snapshot-{next(self._anon)}"
            while name in self.snapshots:
                name = f"snapshot-{next(self._anon)}"
        if name in self.snapshots:
            raise SnapshotError(
                f"a snapshot named {name!r} already exists; delete it first or pick another name"
            )
        holder = Sequence(0)
        self._share_into(holder, seq)
        self.snapshots[name] = Snapshot(
            name,
            holder.pages,
            holder.tokens,
            holder.positions,
            holder.hashes,
            holder.causal_len,
            holder.kv_len,
            state_slot=holder.state_slot,
        )
        return name

    def open(self, name: str) -> Sequence | None:
        """A new sequence forked from the snapshot (None if there is none of that name)."""
        snap = self.snapshots.get(name)
        if snap is None:
            return None
        seq = self.new_sequence()
        if snap.disk_data is not None:
            self._load_from_disk(snap)
        self._share_into(seq, snap)
        return seq

    def take(self, name: str) -> Sequence | None:
        """The snapshot becomes a sequence (its pages move over; the name is gone)."""
        snap = self.snapshots.pop(name, None)
        if snap is None:
            return None
        if snap.disk_data is not None:
            self._load_from_disk(snap)
        seq = self.new_sequence()
        seq.pages, seq.tokens, seq.positions = snap.pages, snap.tokens, snap.positions
        seq.hashes, seq.causal_len, seq.kv_len = snap.hashes, snap.causal_len, snap.kv_len
        seq.state_slot, seq.state_len = snap.state_slot, snap.kv_len if snap.state_slot >= 0 else 0
        return seq

    def delete(self, name: str) -> bool:
        snap = self.snapshots.pop(name, None)
        if snap is None:
            return False
        self.alloc.decref(snap.pages)
        self._free_state_slot(snap)
        return True

    def add_disk_snapshot(self, snap: Snapshot) -> None:
        """A snapshot read from disk: its pages are written to the device when first opened."""
        self.snapshots[snap.name] = snap

    def _load_from_disk(self, snap: Snapshot) -> None:
        assert snap.disk_data is not None
        if snap.disk_state is not None:  # hybrid: the state goes to a slot, or everything is recomputed
            state, snap.disk_state = snap.disk_state, None
            if not self._free_state:
                snap.kv_len = snap.causal_len = 0
                snap.hashes, snap.disk_data = [], None
                return
            snap.state_slot = self._free_state.pop()
            self._write_state(snap.state_slot, state)
        snap.pages = self.alloc_pages(snap.disk_data.shape[0])
        g = self._group(reads=snap.pages)
        if g.written_after_copies() & set(snap.pages):
            g = _PendingOps()
            self._groups.append(g)
        g.write.extend(snap.pages)
        g.write_data.append(snap.disk_data)
        snap.disk_data = None

    # ---- pages for a pass -----------------------------------------------------------------------
    def alloc_pages(self, n: int) -> list[int]:
        """n fresh pages, evicting unused cached pages if needed; OutOfPagesError if still short."""
        self.ensure_free(n)
        return self.alloc.alloc(n)

    def ensure_free(self, n: int) -> bool:
        """Evict unused cached pages until n pages are free; whether there are."""
        if n > self.alloc.num_free:
            self.evict(n - self.alloc.num_free)
        return n <= self.alloc.num_free

    def pages_needed(self, seq: Sequence, kv_end: int) -> int:
        return max(0, -(-kv_end // self.ps) - len(seq.pages))

    def grow(self, seq: Sequence, kv_end: int) -> bool:
        """Give seq pages covering kv_end slots; False (nothing changed) when memory is short."""
        need = self.pages_needed(seq, kv_end)
        if not self.ensure_free(need):
            return False
        seq.pages += self.alloc.alloc(need)
        return True

    def _evictable(self, p: int) -> bool:
        return self.alloc.refcount(p) == 1 and self.alloc.pincount(p) == 0

    def evict(self, n: int) -> int:
        """Free up to n cached pages nobody else holds, least recently used first; returns how many."""
        freed = 0
        if n <= 0 or not self._cache:
            return 0
        for key, p in list(self._cache.items()):
            if freed >= n:
                break
            if self._evictable(p):
                del self._cache[key]
                self._cached_pages.pop(p, None)
                self.alloc.decref([p])
                freed += 1
        self.stats.pages_evicted += freed
        return freed

    # ---- prefix cache ---------------------------------------------------------------------------
    def _key(self, prev: int, tokens, positions) -> int:
        return hash((prev, tuple(tokens), tuple(positions)))

    def match_prefix(self, seq: Sequence, limit: int) -> int:
        """Take cached pages for slots seq.kv_len.. of tokens already appended to seq (a pass about to
        run, or a recompute after preemption); returns how many tokens (a multiple of page_size, at
        most `limit`) are now in seq's KV and need not be computed."""
        ps = self.ps
        kv = seq.kv_len
        if (
            self.hole is not None
            or self.recurrent
            or not self._cache
            or kv % ps
            or seq.causal_len != kv
            or len(seq.hashes) != kv // ps
        ):
            return 0
        prev = seq.hashes[-1] if seq.hashes else _ROOT
        taken = 0
        while taken + ps <= limit:
            lo = kv + taken
            key = self._key(prev, seq.tokens[lo : lo + ps], seq.positions[lo : lo + ps])
            p = self._cache.get(key)
            if p is None:
                break
            self._cache.move_to_end(key)
            self.alloc.incref([p])
            if len(seq.pages) > lo // ps:  # a page we already hold for these slots (a retried pass)
                self.alloc.decref([seq.pages[lo // ps]])
                seq.pages[lo // ps] = p
            else:
                seq.pages.append(p)
            seq.hashes.append(key)
            prev = key
            taken += ps
        seq.kv_len += taken
        seq.causal_len += taken
        self.stats.prefix_tokens_reused += taken
        return taken

    def register(self, seq: Sequence, upto: int) -> None:
        """Cache seq's full causal pages whose KV is complete up to slot `upto`."""
        if self.hole is not None or self.recurrent:  # no prefix cache for these (see __init__, module doc)
            return
        ps = self.ps
        last = min(upto, seq.causal_len, seq.kv_len) // ps
        first = len(seq.hashes)
        if first >= last:
            return
        prev = seq.hashes[-1] if seq.hashes else _ROOT
        for i in range(first, last):
            lo = i * ps
            key = self._key(prev, seq.tokens[lo : lo + ps], seq.positions[lo : lo + ps])
            seq.hashes.append(key)
            prev = key
            p = seq.pages[i]
            if key in self._cache:
                self._cache.move_to_end(key)
            elif p not in self._cached_pages:
                self._cache[key] = p
                self._cached_pages[p] = key
                self.alloc.incref([p])

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        for p in self._cache.values():
            self.alloc.decref([p])
        self._cache.clear()
        self._cached_pages.clear()

    # ---- preemption -----------------------------------------------------------------------------
    def freeable(self, seq: Sequence) -> int:
        """Pages that preempting seq would free (those it alone holds)."""
        if seq.state != RESIDENT or seq.inflight:
            return 0
        return sum(1 for p in seq.pages if self._sole(p))

    def _sole(self, p: int) -> bool:
        """p is held by one sequence alone (besides, maybe, the prefix cache) and no batch uses it."""
        return self.alloc.refcount(p) - (p in self._cached_pages) == 1 and not self.alloc.pincount(p)

    def preempt(self, seq: Sequence, swap: bool) -> None:
        """Take seq's pages away: to host swap slots (swap) or dropped, to be recomputed on resume."""
        assert seq.state == RESIDENT and not seq.inflight
        self.stats.preemptions += 1
        own = [i for i, p in enumerate(seq.pages) if self._sole(p)]
        if swap and len(own) <= len(self._free_slots):
            slots = [-1] * len(seq.pages)
            for i in own:
                s = self._free_slots.pop()
                slots[i] = s
                g = self._groups[-1]
                if g.blocks_swap_out(seq.pages[i], s):
                    g = _PendingOps()
                    self._groups.append(g)
                g.swap_out.append((seq.pages[i], s))
            self.alloc.decref([seq.pages[i] for i in own])
            for i in own:
                seq.pages[i] = -1
            seq.swap_slots = slots
            seq.state = SWAPPED
            self.stats.pages_swapped_out += len(own)
            return
        self.stats.preempted_recompute += 1
        self.alloc.decref(seq.pages)
        seq.pages = []
        seq.hashes = []
        seq.kv_len = 0
        seq.state = DROPPED
        self._free_state_slot(seq)  # recomputing from token 0 rebuilds the state

    def drop(self, seq: Sequence) -> None:
        """Preempt by recompute whatever seq holds (resident or swapped pages): all of it is let go."""
        assert not seq.inflight
        self.stats.preemptions += 1
        self.stats.preempted_recompute += 1
        self._drop_pages(seq)
        seq.hashes = []
        seq.state = DROPPED

    def resume_cost(self, seq: Sequence) -> int:
        """Pages needed to make seq resident again."""
        if seq.state == SWAPPED:
            return sum(1 for p in seq.pages if p < 0)
        return 0

    def ensure_resident(self, seq: Sequence) -> bool:
        """Swap seq's pages back in (False when memory is short). A DROPPED sequence stays so: its KV
        is recomputed by its next pass."""
        if seq.state != SWAPPED:
            return True
        assert seq.swap_slots is not None
        holes = [i for i, p in enumerate(seq.pages) if p < 0]
        if not self.ensure_free(len(holes)):
            return False
        fresh = self.alloc.alloc(len(holes))
        for i, q in zip(holes, fresh, strict=True):
            s = seq.swap_slots[i]
            g = self._groups[-1]
            if q in g.written_after_copies():
                g = _PendingOps()
                self._groups.append(g)
            g.swap_in.append((s, q))
            self._free_slots.append(s)
            seq.pages[i] = q
        seq.swap_slots = None
        seq.state = RESIDENT
        self.stats.pages_swapped_in += len(holes)
        return True

    # ---- page ops -------------------------------------------------------------------------------
    def _group(self, reads=()) -> _PendingOps:
        """The op group to append to: a new one when an op must see the writes of the current group
        (its copies read before its swap-ins and writes land; see PageOps for the order)."""
        g = self._groups[-1]
        if reads and g.written_after_copies() & set(reads):
            g = _PendingOps()
            self._groups.append(g)
        return g

    def _copy(self, src: int, dst: int) -> None:
        g = self._group(reads=[src])
        if dst in g.copy_src:  # dst was freed and handed out again: copy after the first
            g = _PendingOps()
            self._groups.append(g)
        src = g.copy_src.get(src, src)  # copies of one group run at once: read a copied page from its source
        g.copy.append((src, dst))
        g.copy_src[dst] = src

    def take_ops(self) -> list[PageOps]:
        """The page movements queued since the last call, as op sets to apply in order."""
        groups = [g for g in self._groups if g]
        self._groups = [_PendingOps()]
        return [g.to_ops() for g in groups]

    def _require_idle(self, seq: Sequence, what: str) -> None:
        if seq.closed:
            raise PieError(f"cannot {what} a released context")
        if seq.work is not None:
            raise PieError(f"cannot {what} a context while a pass or generation runs on it; await it first")
