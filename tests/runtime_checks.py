"""Checks of the runtime's page accounting shared by the scheduler, SDK and stress tests."""

from __future__ import annotations


def assert_all_free(rt) -> None:
    """Every page is free once the prefix cache lets go of its pages (nothing else may hold one)."""
    kv = rt.kv
    kv.alloc.check()
    kv.clear_cache()
    kv.alloc.check()
    held = [p for p in range(kv.alloc.num_pages) if kv.alloc.refcount(p) or kv.alloc.pincount(p)]
    assert not held, f"pages still held: {held[:20]}"
    assert kv.alloc.num_free == kv.alloc.num_pages


def check_refcounts(rt) -> None:
    """Each page's owner count equals the number of page tables (live sequences, snapshots, the prefix
    cache) that list it: a page listed twice without being counted twice is a future double writer."""
    import numpy as np

    kv, sched = rt.kv, rt.scheduler
    counts = np.zeros(kv.alloc.num_pages, dtype=np.int64)
    for s in sched.seqs.values():
        if not s.closed:
            for p in s.pages:
                if p >= 0:
                    counts[p] += 1
    for snap in kv.snapshots.values():
        for p in snap.pages:
            counts[p] += 1
    for p in kv._cache.values():
        counts[p] += 1
    refs = np.array([kv.alloc.refcount(p) for p in range(kv.alloc.num_pages)])
    bad = np.flatnonzero(counts != refs)
    assert not bad.size, (
        f"pages {bad[:10].tolist()}: listed {counts[bad[:10]].tolist()} times, refs {refs[bad[:10]].tolist()}"
    )
