"""quantlab.utils.memory: which allocator thresholds are set when (glibc's mallopt, recorded here)."""
from __future__ import annotations

import pytest

from quantlab.utils import memory as M


@pytest.fixture
def calls(monkeypatch):
    got: list[tuple[int, int]] = []
    monkeypatch.setattr(M, "_mallopt_fn", lambda: (lambda param, value: got.append((param, value)) or 1))
    monkeypatch.setattr(M, "release_freed_memory", lambda: got.append(("trim", 0)))
    monkeypatch.delenv("QUANTLAB_HEAP_TUNING", raising=False)
    return got


def test_repeated_allocations_is_a_no_op_outside_bounded_heap(calls):
    with M.repeated_allocations():
        pass
    assert calls == []


def test_repeated_allocations_inside_bounded_heap_raises_then_restores_the_thresholds(calls):
    with M.bounded_heap():
        assert calls == [(M.M_MMAP_THRESHOLD, M.HEAP_THRESHOLD), (M.M_TRIM_THRESHOLD, M.HEAP_THRESHOLD)]
        del calls[:]
        with M.repeated_allocations():
            assert calls == [(M.M_MMAP_THRESHOLD, M.REPEAT_MMAP_THRESHOLD), (M.M_TRIM_THRESHOLD, M.REPEAT_TRIM_THRESHOLD)]
            del calls[:]
        # back to the bounded thresholds, and the loop's working set is trimmed
        assert calls == [(M.M_MMAP_THRESHOLD, M.HEAP_THRESHOLD), (M.M_TRIM_THRESHOLD, M.HEAP_THRESHOLD), ("trim", 0)]
        del calls[:]
        with M.bounded_heap():  # nested: nothing changes, and leaving it does not end the outer one
            pass
        assert calls == []
        with M.repeated_allocations():
            pass
        assert calls[0] == (M.M_MMAP_THRESHOLD, M.REPEAT_MMAP_THRESHOLD)
        del calls[:]
    assert calls == [(M.M_MMAP_THRESHOLD, M.GLIBC_DEFAULT_THRESHOLD), (M.M_TRIM_THRESHOLD, M.GLIBC_DEFAULT_THRESHOLD),
                     ("trim", 0)]
    del calls[:]
    with M.repeated_allocations():  # after leaving bounded_heap: a no-op again
        pass
    assert calls == []


def test_heap_tuning_can_be_switched_off(calls, monkeypatch):
    monkeypatch.setenv("QUANTLAB_HEAP_TUNING", "0")
    with M.bounded_heap(), M.repeated_allocations():
        pass
    assert calls == []
