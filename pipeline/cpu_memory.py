"""Allocator tuning for CPU work, for programs to opt into: the ``tsae`` command (``cli.py``), the harvest's
dask workers and the benchmarks call it; library calls never change the process's allocator."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel (process-wide,
    once): trim threshold 1 GiB, mmap threshold fixed at its maximum (32 MiB). Returns whether it applied
    (False off glibc).

    Why: a CPU training step or LM forward allocates and frees tens of MB of temporaries ([batch, d_model]
    activations and gradients, weight-sized casts). With glibc's defaults freed memory is often unmapped
    or trimmed, so the next step's temporaries page-fault on first touch: measured on this project's 2-core
    host as a large, erratic share of the work (one 9 MB elementwise op took 1 ms or 10 ms depending on it;
    a SmolLM2 harvest forward ran ~4% slower merely because the previous batch's activations were still
    alive; ``benchmarks/train.py`` and ``benchmarks/harvest.py`` run with it). The cost is a process that
    keeps its peak heap. Tensors above 32 MiB are still mmapped; PyTorch's ``THP_MEM_ALLOC_ENABLE=1``
    (which ``cli.py`` sets unless the environment says otherwise) backs them with huge pages.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
    except (OSError, AttributeError):
        return False
