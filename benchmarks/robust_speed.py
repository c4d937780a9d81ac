"""Accuracy under perturbation: one fit plus k matrix products. `vt robust accuracy` over 10 perturbed test
sets against one `vt probe` on the clean caches (same model, data, spec and protocol), timed in one run.

Extracts (once, into a temporary cache) Lite0's clean shared DTD caches and 10 random-PatchDrop test caches,
then times `run_probe` (default protocol, prelogits) and `run_accuracy` over the 10 perturbations. Target:
the robust run at most 1.2x the probe run.

    python benchmarks/robust_speed.py [--protocol default]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
MODEL = "tf_efficientnet_lite0"
RATIOS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="default")
    parser.add_argument("--tokens", default="prelogits")
    args = parser.parse_args()

    from vtbench.extract import extract
    from vtbench.robust import run_accuracy
    from vtbench.transfer import run_probe

    root = SHARED / "data" / "dtd"
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "c"
        extract(MODEL, "dtd", None, root, weights=str(WEIGHTS), cache_dir=cache, progress=False, log=lambda m: None)
        extract(MODEL, "dtd", ["test"], root, weights=str(WEIGHTS), cache_dir=cache, progress=False,
                perturb=[f"patchdrop:random:{r:g}" for r in RATIOS], log=lambda m: None)
        t0 = time.perf_counter()
        (probe,) = run_probe(MODEL, "dtd", args.tokens, args.protocol, cache_dir=cache, results_dir=Path(tmp) / "p")
        t_probe = time.perf_counter() - t0
        t0 = time.perf_counter()
        records = run_accuracy(MODEL, "dtd", args.tokens, args.protocol, cache_dir=cache, results_dir=Path(tmp) / "r")
        t_robust = time.perf_counter() - t0
    print(f"{MODEL} on shared DTD, {args.tokens}, {args.protocol}: clean top-1 {probe['metrics']['top1']:.2f}")
    for rec in records:
        p = rec.get("perturbation")
        name = "clean" if not p else f"drop {p['ratio']:.0%}"
        print(f"  {name:10s} top-1 {rec['metrics']['top1']:6.2f}  "
              f"relative {rec['metrics']['relative']:.3f}")
    print(f"vt probe on the clean caches:                 {t_probe:6.2f} s")
    print(f"vt robust accuracy, clean + {len(records) - 1} perturbed test sets: {t_robust:6.2f} s")
    print(f"ratio: {t_robust / t_probe:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
