"""`vt probe` start-up with many cache files in the cache root.

Copies the two small digits caches of tests/fixtures/legacy into a fresh root, adds N filler caches
(other models, same dataset), and times `vt probe -p knn` on the digits caches (a probe of well
under a second, so the wall time is start-up plus lookup) with 0 and with N fillers, median of 3.
Prints the difference: what the fillers cost the lookup.

    python benchmarks/cache_startup.py [--fillers 200]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "fixtures" / "legacy" / "cache"
VT = Path(sys.executable).with_name("vt")
REPEATS = 3


def _write_cache():
    try:
        from vtbench.cache import write_cache
    except ImportError:  # vtbench before the cache package
        from vtbench.extract.cache import write_cache
    return write_cache


def add_fillers(root: Path, count: int) -> None:
    write_cache = _write_cache()
    rng = np.random.default_rng(0)
    for i in range(count):
        meta = {"format_version": 1, "model": f"filler_{i:03d}", "model_kwargs": {}, "weights_sha256": f"{i:064x}",
                "weights_source": "random-init", "transform": {"mode": "model", "input_size": [3, 224, 224]},
                "norm": True, "dtype": "float16", "dataset": "digits", "split": ("train", "test")[i % 2],
                "data_fingerprint": "filler", "token_kinds": ["cls"], "precision": "fp32",
                "timm_version": "x", "torch_version": "x"}
        feats = {("cls", b): rng.standard_normal((50, 64)).astype(np.float32) for b in range(12)}
        write_cache(root, meta, feats, np.arange(50) % 10, [str(r) for r in range(50)], [str(c) for c in range(10)])


def time_probe(root: Path, results: Path) -> float:
    cmd = [str(VT), "probe", "-m", "vit_tiny_patch16_224", "-d", "digits", "-t", "cls[-1]", "-p", "knn",
           "--cache-dir", str(root), "--results", str(results)]
    walls = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fillers", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        shutil.copytree(LEGACY, root)
        alone = time_probe(root, Path(tmp) / "r0")
        add_fillers(root, args.fillers)
        crowded = time_probe(root, Path(tmp) / "r1")
        again = time_probe(root, Path(tmp) / "r2")
    print(f"vt probe, 2 caches in the root:                {alone:6.2f} s")
    print(f"vt probe, {args.fillers} more caches (first run):     {crowded:6.2f} s")
    print(f"vt probe, {args.fillers} more caches (later runs):    {again:6.2f} s")
    print(f"cost of the {args.fillers} caches: first {crowded - alone:+.2f} s, later {again - alone:+.2f} s")


if __name__ == "__main__":
    main()
