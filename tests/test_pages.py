import numpy as np
import pytest

from pie.errors import PieError
from pie.runtime.pages import OutOfPagesError, PageAllocator


def test_fresh_allocator_hands_out_ids_in_order():
    a = PageAllocator(8)
    assert a.num_free == 8
    assert a.alloc(3) == [0, 1, 2]
    assert a.alloc(2) == [3, 4]
    assert a.num_free == 3 and a.num_used == 5
    assert [a.refcount(i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert a.alloc(0) == []


def test_decref_frees_at_zero_and_reuses_lifo_in_callers_order():
    a = PageAllocator(6)
    ids = a.alloc(4)  # 0 1 2 3
    a.incref(ids[:2])  # 0 and 1 shared (e.g. by a fork)
    a.decref(ids)
    assert [a.refcount(i) for i in range(4)] == [1, 1, 0, 0]
    assert a.num_free == 4
    # freed 2, 3 come back first, in the order they were freed; then the untouched 4, 5
    assert a.alloc(3) == [2, 3, 4]
    a.free(np.array([0, 1]))
    assert a.alloc(3) == [0, 1, 5]
    assert a.num_free == 0


def test_repeated_ids_in_one_call():
    a = PageAllocator(4)
    a.alloc(2)
    a.incref([1, 1])
    assert a.refcount(1) == 3
    a.decref([1, 1, 1, 0])
    assert a.num_free == 4


def test_out_of_pages_error_says_counts_and_config_keys():
    a = PageAllocator(4)
    a.alloc(3)
    with pytest.raises(OutOfPagesError) as e:
        a.alloc(2)
    msg = str(e.value)
    assert "asked for 2" in msg and "1 of 4 free" in msg
    assert isinstance(e.value, PieError)
    assert a.num_free == 1  # a failed alloc takes nothing


def test_double_free_and_bad_incref_are_caught():
    a = PageAllocator(4)
    ids = a.alloc(1)
    a.decref(ids)
    with pytest.raises(ValueError, match="double free"):
        a.decref(ids)
    with pytest.raises(ValueError, match="unowned page"):
        a.incref([2])
    with pytest.raises(ValueError):
        PageAllocator(0)


def test_pins_keep_a_released_page_from_being_handed_out_again():
    """A pass in flight pins its pages: an owner dropping them cannot give them to a new owner."""
    a = PageAllocator(3)
    ids = a.alloc(2)  # 0 1
    a.pin(ids)
    a.decref(ids)  # the context is closed while its pass is in flight
    assert a.num_free == 1 and a.alloc(1) == [2]  # 0 and 1 are not handed out
    a.unpin(ids)  # the batch ended
    assert a.num_free == 2
    a.check()
    assert not a.is_shared(2)
    a.incref([2])
    assert a.is_shared(2) and a.pincount(2) == 0
    with pytest.raises(ValueError, match="unpin below zero"):
        a.unpin([2])
