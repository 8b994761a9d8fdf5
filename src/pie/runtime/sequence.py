"""A sequence: the runtime's record of one context's KV cache. SDK contexts are handles to one.

    pages       page table: pages[i] holds KV slots i*page_size .. (i+1)*page_size - 1
    tokens      token id of every slot written or being written (a generated token whose value is
                still on the device is -1 until its batch returns), positions likewise
    kv_len      slots valid on the device; < len(tokens) only after preemption by recompute
                (resume recomputes tokens[kv_len:]) and during a prefix match
    hashes      prefix-cache key of each full page of the causal prefix (see kvcache.py)
    causal_len  tokens [0, causal_len) were computed with plain causal attention, so their KV is a
                function of (tokens, positions) alone: shareable through the prefix cache, and exactly
                recomputable after preemption

    state_slot  hybrid models (recurrent layers): the driver's state-pool slot holding the recurrent state
                of tokens [0, state_len); -1 when it holds none. The state is usable only when
                state_len == kv_len (a failed or cancelled pass leaves them apart: the next pass then
                recomputes the sequence from its first token, which rebuilds the state)

Invariant: a sequence's partial last page is never shared (fork, save and truncate copy it), so a
sequence only ever writes into pages it alone holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pie.runtime.work import Work

RESIDENT, DROPPED, SWAPPED = "resident", "dropped", "swapped"


@dataclass(eq=False)
class Sequence:
    id: int
    pages: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    kv_len: int = 0
    hashes: list[int] = field(default_factory=list)
    causal_len: int = 0
    state: str = RESIDENT
    swap_slots: list[int] | None = None  # host slot per page while SWAPPED (-1: page stayed on device)
    released: int = 0  # pages [0, released) left the sliding window: they are the KV cache's hole page
    work: Work | None = None  # the pass or generation queued / running on it
    inflight: int = 0  # batches holding pins on its pages
    priority: float = 0.0  # higher is preempted later (scheduling hints)
    last_step: int = 0  # last step it ran in (victim order)
    closed: bool = False
    state_slot: int = -1  # recurrent-state slot (hybrid models), -1: none
    state_len: int = 0  # tokens the slot's state covers

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.id}, tokens={len(self.tokens)}, kv_len={self.kv_len}, pages={self.pages}, "
            f"{self.state})"
        )
