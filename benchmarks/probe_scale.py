"""Probes beyond memory: the streamed `default` probe on synthetic caches of 100k and 1M rows x 1536 dims.

Writes synthetic float16 caches with the cache writer (4 class-token blocks of 384 dims, 10 classes:
class means plus unit noise; N train rows, N/10 val and N/10 test), then runs
`vt probe -p default -t 'cls[-4:]' --max-memory 1G` on each through the Python API in a fresh
process, and prints its wall time, its passes over the features and its peak RSS, then the ratios
between the largest and the smallest N, in one run. Targets: peak RSS within 1.2x while N grows 10x;
time growing at most linearly (its ratio at most the ratio of N).

    python benchmarks/probe_scale.py [--rows 100000 1000000] [--max-memory 1G] [--work DIR]

With --work, the caches are kept there and reused by the next run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS, DIM, CLASSES, CHUNK = 4, 384, 10, 8192
SEPARATION = 0.06  # class-mean scale per dimension: a probe that is neither trivial nor hopeless
CHILD = """
import json, resource, sys, time
from vtbench.transfer import run_probe
t0 = time.perf_counter()
(record,) = run_probe("synthetic_vit", "dtd", ["cls[-4:]"], protocol="default", cache_dir=sys.argv[1],
                      results_dir=sys.argv[2], max_memory=sys.argv[3], device="cpu")
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "top1": record["metrics"]["top1"], "l2": record["selection"]["chosen"],
                  "streamed": record["solver"].get("streamed"),
                  "iterations": sum(record["solver"]["selection"]["iterations"]) + record["solver"]["refit"]["iterations"]}))
"""


def write_split(root: Path, split: str, rows: int, seed: int) -> None:
    from vtbench.cache.store import CacheWriter, Layout

    means = np.random.default_rng(123).standard_normal((CLASSES, BLOCKS * DIM)).astype(np.float32) * SEPARATION
    meta = {"format_version": 1, "model": "synthetic_vit", "model_kwargs": {}, "weights_sha256": "0" * 64,
            "weights_source": "synthetic", "transform": {"mode": "model", "input_size": [3, 224, 224]}, "norm": True,
            "dtype": "float16", "dataset": "dtd:1", "split": split, "data_fingerprint": f"synthetic-{split}-{rows}",
            "token_kinds": ["cls"], "precision": "fp32", "timm_version": "x", "torch_version": "x"}
    labels = np.arange(rows) % CLASSES
    writer = CacheWriter.open(root, meta, Layout({"cls": [DIM] * BLOCKS}), labels, [str(i) for i in range(rows)],
                              [f"c{c}" for c in range(CLASSES)], batch_size=CHUNK)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        x = rng.standard_normal((n, BLOCKS * DIM), dtype=np.float32) + means[labels[start : start + n]]
        writer.write(start, {("cls", b): x[:, b * DIM : (b + 1) * DIM] for b in range(BLOCKS)})
        writer.commit()
    writer.finalize()


def synthetic_caches(root: Path, rows: int) -> float:
    """The caches of N = rows under root (written unless there); the seconds it took."""
    if any(root.rglob("*.h5")):
        return 0.0
    t0 = time.perf_counter()
    for seed, (split, n) in enumerate([("train", rows), ("val", rows // 10), ("test", rows // 10)]):
        write_split(root, split, n, seed)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--max-memory", default="1G")
    parser.add_argument("--work", type=Path, help="keep the synthetic caches here (reused when present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        runs = {}
        for rows in args.rows:
            root = work / f"n{rows}"
            made = synthetic_caches(root, rows)
            disk = sum(p.stat().st_size for p in root.rglob("*.h5")) / 2**30
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(Path(tmp) / f"r{rows}"), args.max_memory],
                                 capture_output=True, text=True, check=True).stdout
            run = runs[rows] = json.loads(out.strip().splitlines()[-1])
            passes = run["streamed"]["passes"] if run["streamed"] else 0
            print(f"N = {rows:8d} x {BLOCKS * DIM}: {run['seconds']:7.1f} s, {passes} passes "
                  f"({run['seconds'] / max(1, passes):.2f} s each), {run['iterations']} L-BFGS iterations, peak RSS "
                  f"{run['peak_mib']:6.0f} MiB; top-1 {run['top1']:.2f}, l2 {run['l2']:g}; caches {disk:.2f} GiB"
                  + (f", written in {made:.0f} s" if made else ""), flush=True)
        small, large = min(runs), max(runs)
        if small != large:
            a, b = runs[small], runs[large]
            print(f"N x{large / small:g}: peak RSS x{b['peak_mib'] / a['peak_mib']:.2f} (target <= 1.2), "
                  f"time x{b['seconds'] / a['seconds']:.2f} (target <= {large / small:g})")


if __name__ == "__main__":
    main()
