"""Giving freed heap memory back to the operating system (glibc), so a long calibration's RSS is its live memory.

PyTorch's CPU allocator takes tensors from the C library's ``malloc``. glibc keeps freed blocks below
its (dynamically raised, up to 32 MiB) mmap threshold in the heap, and with long-lived small
tensors (codes, statistics) between the transient large ones the heap cannot shrink from the top:
quantizing SmolLM2-135M with GPTQ, the process grew block after block although the freed tensors were
no longer alive, and ``malloc_trim(0)`` gave that memory back. :func:`release_freed_memory` calls it
between blocks (a few ms; a no-op off glibc), and :func:`bounded_heap` keeps the large transient
tensors of a block out of the heap while calibrating. Neither changes a computed value.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _trim_fn():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        log.debug("malloc_trim is not available; freed memory stays with the allocator")
        return None


def release_freed_memory() -> None:
    """``malloc_trim(0)``: return the allocator's free pages to the OS (CUDA memory is untouched)."""
    fn = _trim_fn()
    if fn is not None:
        fn(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
HEAP_THRESHOLD = 256 * 1024  # tensors at least this large get their own mapping during calibration
GLIBC_DEFAULT_THRESHOLD = 128 * 1024
REPEAT_MMAP_THRESHOLD = 32 * 2**20  # glibc's own upper bound for its dynamic threshold
REPEAT_TRIM_THRESHOLD = 2**30  # never trim inside a repeated loop (trimmed on leaving it)
_bounded = False  # inside bounded_heap (the thresholds are process-wide)


@contextmanager
def bounded_heap() -> Iterator[None]:
    """While calibrating, every allocation >= 256 KiB is its own ``mmap`` (returned to the OS on free)
    and the heap top is trimmed past 256 KiB, so the process's RSS follows its live tensors.

    glibc's default raises the mmap threshold each time a mapped block is freed (up to 32 MiB), after
    which the transient activations of a block forward live in the heap, fragment it and keep the
    RSS at its high-water mark: GPTQ on SmolLM2-135M (32 x 256 tokens, ``scripts/bench_ptq.py --methods
    gptq``, 2026-12-07, before issue 19's GPTQ solver work) needs 1.53x the model's bytes without this,
    1.31x with it (55.1 s vs 60.6 s). On leaving, both thresholds are set to
    glibc's initial 128 KiB (the dynamic adjustment stays off: mallopt cannot turn it back on).
    ``QUANTLAB_HEAP_TUNING=0`` leaves the allocator alone; a no-op off glibc.
    """
    global _bounded
    fn = _mallopt_fn() if os.environ.get("QUANTLAB_HEAP_TUNING", "1") != "0" else None
    if fn is None or _bounded:
        yield
        return
    fn(M_MMAP_THRESHOLD, HEAP_THRESHOLD)
    fn(M_TRIM_THRESHOLD, HEAP_THRESHOLD)
    _bounded = True
    try:
        yield
    finally:
        _bounded = False
        fn(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        fn(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        release_freed_memory()


@contextmanager
def repeated_allocations() -> Iterator[None]:
    """Inside :func:`bounded_heap`: a loop that makes the same transient tensors over and over (a grid
    search's candidate forwards) takes them from the heap again, so they are page-faulted once.

    Whatever is alive when the loop starts (cached activations, reference outputs) was mapped on its
    own under :func:`bounded_heap` and cannot fragment the heap; inside, tensors below 32 MiB come
    from the heap and freed memory is kept for the next candidate (no trimming). On leaving, the
    bounded thresholds come back and the heap is trimmed, so the loop's working set is given back
    before the next one. Outside :func:`bounded_heap` (or with ``QUANTLAB_HEAP_TUNING=0``) a no-op.
    Values are unchanged; only where the allocator takes memory from.
    """
    fn = _mallopt_fn() if _bounded else None
    if fn is None:
        yield
        return
    fn(M_MMAP_THRESHOLD, REPEAT_MMAP_THRESHOLD)
    fn(M_TRIM_THRESHOLD, REPEAT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        fn(M_MMAP_THRESHOLD, HEAP_THRESHOLD)
        fn(M_TRIM_THRESHOLD, HEAP_THRESHOLD)
        release_freed_memory()


@functools.lru_cache(maxsize=1)
def _mallopt_fn():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
