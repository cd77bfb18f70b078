"""A process's freed memory on glibc: kept for reuse while a process works, given back between trials.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, raised on the fly up
to 32 MiB) with fresh pages from the kernel and unmaps them on free. A training step allocates
tensors far above that every time: the [batch, len, vocab] logits, their float32 copy and their
gradient (200 MB each for 4 x 256 tokens of SmolLM2's 49k vocabulary), so every step page-faults
and the kernel zeroes them again: a loop of allocating and filling such a tensor took 102 ms
against 14 ms once reused, and a LoRA step of SmolLM2 compressed by 40 % 4.9-5.6 s against 3.8 s
in float32, 4.2 s against 2.7-2.9 s under bf16 autocast (BENCHMARKS "heal"). `keep_freed_memory`
raises the mmap and trim thresholds so that freed blocks stay in the heap and are reused;
`release_memory` gives them back (and what only the cyclic collector frees) when a trial ends.
Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import gc
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_LARGEST = 2**31 - 1  # mallopt takes an int: allocations above 2 GiB are still mapped on their own


def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Keep freed blocks up to 2 GiB in the heap for reuse (see the module docstring); whether
    the C library took it. The process then keeps its peak memory until `release_memory`."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST))


def release_memory() -> None:
    """Give a finished trial's memory back before the reused actor runs the next trial.

    Without this the quickstart's two reused SmolLM2 workers grew by ~1.4 GB per trial (node
    memory 10 -> 19 GB over 10 trials) until Ray's memory monitor killed one; with it node memory
    stayed flat at ~10 GB. Two causes are covered: modules and optimizer state in reference
    cycles, which only the cyclic collector frees, and freed tensor memory that glibc keeps in
    its heap until trimmed (`malloc_trim` returns it whatever the trim threshold).
    """
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
