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
