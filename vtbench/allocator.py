"""Process-wide C allocator tuning: freed memory is kept for reuse instead of being handed back to the OS.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``. A forward pass allocates activations of tens of MiB per
layer, so every batch page-faults and zeroes them again: on the 2-core CI machine that kernel
work took more CPU than the forward itself (tf_efficientnet_lite0, batch 32: sys 4.3 s against
user 3.7 s; 62 img/s, and 195 img/s with the thresholds raised). This is the same problem that
the usual advice to preload jemalloc or tcmalloc for CPU inference addresses, solved in-process.

Raising the mmap and trim thresholds lets freed blocks serve the next batch (on a glibc that refuses
an mmap threshold above 32 MiB, turning mmap off does the same: Lite0 185 vs 182 img/s, untuned 67
img/s, measured here by refusing the threshold on purpose). The price is memory:
blocks kept in the heap cannot serve every later size, so the peak grows (a Lite0 extraction of
GTSRB at batch 64: 1.7-1.8 GB without, 2.3-2.6 GB with; a 256 MiB threshold gave 2.3 GB at
18.7 s instead of 15.1 s, 64 MiB 1.8 GB at 29.1 s, untuned 37.4 s). It stays flat in the dataset
size, and memory freed after the peak stays with the process until it exits. ``extract()``,
``run_probe()`` and ``run_fewshot()`` apply it, and so every ``vt`` command that computes. Set
``VT_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import os
import sys

# glibc's mallopt parameters (malloc.h) and the threshold both are raised to.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as the module doc says (once per process); whether it is tuned.

    A no-op returning False off Linux/glibc or with ``VT_KEEP_FREED_MEMORY=0``.
    """
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("VT_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None)  # the symbols already loaded into this process
            except OSError:
                return False
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):  # glibc, not musl
                _applied = _tune(libc)
    return _applied


def _tune(libc) -> bool:
    """Raise the trim and mmap thresholds through ``libc.mallopt``; whether both took."""
    trim = bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
    # Older glibc releases refuse an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2); there, serving no
    # block with mmap at all keeps freed blocks in the heap just the same (blocks of 1 GiB and more too).
    kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) or bool(libc.mallopt(_M_MMAP_MAX, 0))
    return trim and kept
