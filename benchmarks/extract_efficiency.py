"""How close is `vt extract` to the model's own speed, and does its memory stay flat?

Prints, measured in this one run on this machine:

1. end-to-end `extract()` img/s (listing, decoding, forward, HDF5 writes, finalize) divided by a
   bare forward loop over pre-made tensors: same model, batch size, torch threads and memory
   format (channels_last, which extract uses) and the same allocator tuning
   (``vtbench.allocator.keep_freed_memory``, which extract applies; it is applied here before
   anything runs, so the bare loop gets it too). Target on a 2-core CPU: >= 0.9 for
   tf_efficientnet_lite0 on shared DTD. For reference it also prints the ratio to the same
   bare loop in torch's default NCHW format, and to a plain loop in a fresh process that has
   no allocator tuning, i.e. to what a hand-written ``model(x)`` loop gets.
2. the cost of extracting every block vs only the pre-logit feature. Target: <= 10% more.
3. peak RSS of an extraction at two dataset sizes (8x apart), each in a fresh process. Target: flat.

    python benchmarks/extract_efficiency.py [--data ../shared/data] [--weights ...] [--splits train,val,test]
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
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def bare_forward_rate(backbone, images: torch.Tensor, batch_size: int, memory_format=torch.channels_last) -> float:
    """img/s of model forward + pre-logits over already-decoded tensors (the ceiling for extract)."""
    backbone.model.to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)
    with torch.inference_mode():
        backbone.model.forward_features(images[:batch_size])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
        return len(images) / (time.perf_counter() - t0)


PLAIN_CHILD = r"""
import sys, time, torch
images = torch.load(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from extract_efficiency import bare_forward_rate
from vtbench.models import create_backbone
print(bare_forward_rate(create_backbone(sys.argv[3], sys.argv[4]), images, int(sys.argv[5])))
"""


def plain_forward_rate(model: str, weights: str, images_file: Path, batch_size: int) -> float:
    """The bare channels_last loop in a fresh process whose allocator vtbench has not tuned."""
    import os

    env = {**os.environ, "VT_KEEP_FREED_MEMORY": "0"}
    res = subprocess.run([sys.executable, "-c", PLAIN_CHILD, str(images_file), str(Path(__file__).parent), model,
                          weights, str(batch_size)], env=env, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def extract_rate(backbone, dataset, splits, root, batch_size, kinds=None) -> float:
    """img/s of one end-to-end extract() call over ``splits`` (into a fresh cache directory)."""
    from vtbench.extract import extract

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        reports = extract(backbone, dataset, splits, root, cache_dir=out, batch_size=batch_size, kinds=kinds, progress=False)
        return sum(r.n for r in reports) / (time.perf_counter() - t0)


MEMORY_CHILD = r"""
import json, resource, sys, tempfile
from vtbench.extract import extract
folder, out = sys.argv[1], sys.argv[2]
extract("vit_small_patch16_224", f"imagefolder:{folder}", "train", weights="random",
        model_kwargs={"img_size": 32}, out=out, batch_size=256, progress=False, dtype="float32")
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_memory(n_images: int, workdir: Path) -> float:
    from PIL import Image

    folder = workdir / f"imgs{n_images}"
    rng = np.random.default_rng(0)
    for i in range(n_images):
        d = folder / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(folder), str(workdir / f"cache{n_images}")],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"))
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--splits", default="train,val,test", help="DTD splits to extract (default: all 400 images)")
    parser.add_argument("--repeats", type=int, default=2, help="each rate is the best of this many runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-sizes", default="1000,8000")
    args = parser.parse_args()

    from vtbench.allocator import keep_freed_memory
    from vtbench.data import get_dataset
    from vtbench.models import build_transform, create_backbone

    tuned = keep_freed_memory()
    threads = torch.get_num_threads()
    backbone = create_backbone(args.model, args.weights)
    splits = args.splits.split(",")
    transform, _ = build_transform(backbone.data_config)
    images = []
    for split in splits:
        imageset = get_dataset("dtd", split, args.data / "dtd")
        images += [transform(imageset.load(i)) for i in range(len(imageset))]
    images = torch.stack(images)
    print(f"{args.model} on shared DTD {'+'.join(splits)}: {len(images)} images, batch {args.batch_size}, "
          f"{threads} torch threads, best of {args.repeats}, allocator tuned: {tuned}")
    workdir = tempfile.TemporaryDirectory()
    images_file = Path(workdir.name) / "images.pt"
    torch.save(images, images_file)

    # Rounds interleave the four measurements, so that this machine's drift (whole-run rates move by
    # up to 50% between minutes) hits all of them alike; each rate is the best over the rounds.
    rounds = []
    for _ in range(args.repeats):
        rounds.append({
            "nchw": bare_forward_rate(backbone, images, args.batch_size, torch.contiguous_format),
            "bare": bare_forward_rate(backbone, images, args.batch_size),
            "full": extract_rate(backbone, "dtd", splits, args.data / "dtd", args.batch_size),
            "pre": extract_rate(backbone, "dtd", splits, args.data / "dtd", args.batch_size, kinds=["prelogits"]),
            "plain": plain_forward_rate(args.model, args.weights, images_file, args.batch_size),
        })
        r = rounds[-1]
        print(f"  round {len(rounds)}: bare NCHW {r['nchw']:.1f}, bare channels_last {r['bare']:.1f}, plain untuned "
              f"{r['plain']:.1f}, extract every block {r['full']:.1f}, pre-logits {r['pre']:.1f} img/s; "
              f"extract/bare {r['full'] / r['bare']:.3f}")
    workdir.cleanup()
    nchw, bare, full, pre, plain = (max(r[k] for r in rounds) for k in ("nchw", "bare", "full", "pre", "plain"))
    ratios = sorted(r["full"] / r["bare"] for r in rounds)
    print(f"bare forward, pre-made tensors, NCHW         : {nchw:7.2f} img/s")
    print(f"bare forward, pre-made tensors, channels_last: {bare:7.2f} img/s")
    print(f"plain loop, fresh process, allocator untuned : {plain:7.2f} img/s")
    print(f"vt extract, every block                      : {full:7.2f} img/s")
    print(f"vt extract, pre-logits only                  : {pre:7.2f} img/s")
    print(f"RATIO extract/bare (same format)             : {full / bare:.3f}   (target >= 0.9)")
    print(f"  per round: median {np.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    print(f"ratio extract/bare NCHW (reference)          : {full / nchw:.3f}")
    print(f"ratio extract/plain untuned loop (reference) : {full / plain:.3f}")
    print(f"RATIO every-block cost / pre-logits          : {pre / full:.3f}   (target <= 1.10)")

    sizes = [int(s) for s in args.memory_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        peaks = [peak_memory(n, Path(tmp)) for n in sizes]
    for n, peak in zip(sizes, peaks):
        print(f"peak RSS, {n:6d} images (vit_small 32px, all 12 blocks): {peak:7.1f} MiB")
    print(f"RATIO peak RSS {sizes[-1]}/{sizes[0]} images : {peaks[-1] / peaks[0]:.3f}   (flat: ~1.0)")


if __name__ == "__main__":
    main()
