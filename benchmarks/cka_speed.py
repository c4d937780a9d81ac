"""Streaming CKA: 12 x 12 blocks of N x 384 rows from a synthetic float16 cache, time and peak memory.

Writes synthetic caches (12 class-token blocks of 384 dims, correlated across blocks) of N = 10k and
100k rows with the cache writer, then runs `vt robust cka` on each in a fresh process and prints its wall
time and peak RSS. Targets: under a minute at 100k rows on 2 cores, peak memory flat while N grows 10x.

    python benchmarks/cka_speed.py [--rows 10000 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS, DIM, CHUNK = 12, 384, 8192
CHILD = """
import resource, sys, time
from vtbench.robust import run_cka
t0 = time.perf_counter()
run_cka("synthetic_vit", "digits", kinds=["cls"], split="test", cache_dir=sys.argv[1], results_dir=sys.argv[2])
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_synthetic(root: Path, rows: int) -> None:
    from vtbench.cache.store import CacheWriter, Layout

    rng = np.random.default_rng(0)
    meta = {"format_version": 1, "model": "synthetic_vit", "model_kwargs": {}, "weights_sha256": "0" * 64,
            "weights_source": "synthetic", "transform": {"mode": "model", "input_size": [3, 224, 224]}, "norm": True,
            "dtype": "float16", "dataset": "digits", "split": "test", "data_fingerprint": f"synthetic-{rows}",
            "token_kinds": ["cls"], "precision": "fp32", "timm_version": "x", "torch_version": "x"}
    writer = CacheWriter.open(root, meta, Layout({"cls": [DIM] * BLOCKS}), np.arange(rows) % 10,
                              [str(i) for i in range(rows)], [str(c) for c in range(10)], batch_size=CHUNK)
    mix = rng.standard_normal((BLOCKS, DIM, DIM)) / np.sqrt(DIM)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        h = rng.standard_normal((n, DIM)).astype(np.float32)
        feats = {}
        for b in range(BLOCKS):  # each block a noisy mix of the last: CKA falls with distance
            h = 0.8 * h @ mix[b].astype(np.float32) + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
            feats[("cls", b)] = h
        writer.write(start, feats)
        writer.commit()
    writer.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            root = Path(tmp) / f"c{rows}"
            t0 = time.perf_counter()
            write_synthetic(root, rows)
            made = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(Path(tmp) / f"r{rows}")],
                                 capture_output=True, text=True, check=True).stdout.split()
            seconds, peak = float(out[-2]), float(out[-1])
            print(f"N = {rows:7d}: CKA of {BLOCKS} x {BLOCKS} blocks of {DIM} dims in {seconds:6.1f} s, peak RSS "
                  f"{peak:6.0f} MiB (cache written in {made:.0f} s)")


if __name__ == "__main__":
    main()
