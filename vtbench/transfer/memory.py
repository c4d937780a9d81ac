"""The memory budget of a probe: whether a split's features are held in memory or streamed from the cache.

A probe whose features (times what its solver holds per value) exceed the budget reads them a chunk
of rows at a time instead (:meth:`vtbench.transfer.features.Split.chunks`): the ``default`` probe's
solver sums its loss and gradient over chunks (:class:`vtbench.transfer.solver.RowSource`) and k-NN
searches the bank a chunk at a time. The answers are the same; only memory and time differ.
"""

from __future__ import annotations

import os
import re

from vtbench.errors import VTError

# Peak bytes a probe holds per feature value (rows x width of train+val) when it works in
# memory: the cached float32 blocks, the stacked and standardised copies and the solver's float32
# and float64 bases for the logistic probe; the bank, its normalised copy and faiss's for k-NN.
# Measured in docs/benchmarks.md ("Probes beyond memory").
BYTES_PER_VALUE = {"logistic": 48, "knn": 12}
# A streamed chunk takes at most this share of the budget, and at most CHUNK_BYTES, in float64.
CHUNK_SHARE = 16
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 64
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def machine_memory() -> int:
    """Physical memory in bytes (8 GiB where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def memory_budget(max_memory: str | int | None = None) -> int:
    """``--max-memory`` in bytes: ``"512M"``, ``"16G"``, ``"1.5GiB"`` or a number of bytes; by default half
    the machine's memory. VTError for anything else."""
    if max_memory is None:
        return machine_memory() // 2
    if isinstance(max_memory, int):
        value = max_memory
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(max_memory).lower())
        if not match:
            raise VTError(f"--max-memory must be a size such as 512M, 16G or a number of bytes, not '{max_memory}'")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise VTError(f"--max-memory must be positive, not '{max_memory}'")
    return value


def chunk_rows(rows: int, width: int, budget: int, kind: str) -> int | None:
    """Rows per streamed chunk for ``rows x width`` features under ``budget`` bytes, or None when the probe
    ``kind`` (``logistic``, ``knn``) holds them in memory."""
    if rows * width * BYTES_PER_VALUE[kind] <= budget:
        return None
    chunk_bytes = min(CHUNK_BYTES, budget // CHUNK_SHARE)
    return max(MIN_CHUNK_ROWS, chunk_bytes // (8 * max(1, width)))
