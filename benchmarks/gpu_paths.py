"""The CUDA paths in one short run, prepared for a session that is lent a GPU.

On the GPU machine (its image has torch, timm, h5py, scikit-learn and typer; vtbench imports
faiss and HF `datasets` lazily and needs neither here), from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_paths.py --out $OUT/gpu_paths.json

and here, to check the script itself on the CPU with a tiny model:

    .venv/bin/python benchmarks/gpu_paths.py --device cpu --model test_vit --images 400 --classes 10

It writes a synthetic JPEG imagefolder (smooth random images of 240-400 px, so that decoding
costs about what real photos cost), then prints and writes as JSON, measured in this one run:

1. bare forward img/s over pre-made tensors (channels_last), in float32 and under bf16 autocast;
2. `extract()` end to end (decode workers, AMP, channels_last, HDF5 writes) in img/s, and its
   ratio to the bf16 bare forward: on a GPU, decoding rather than the forward is expected to bound it;
3. `run_probe` (`default` and `knn`) on that cache: seconds on the device and on the CPU;
4. `episode_accuracies` (`lr`, 600 Meta-Dataset episodes) on that cache: seconds on the device and
   on the CPU, and the difference in mean accuracy.

The weights are random (no download), which leaves every timing valid; the accuracies only show
that both devices agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_images(root: Path, n: int, classes: int, seed: int = 0) -> None:
    """``n`` JPEGs in ``root/{train,test}/<class>/``: smooth colour fields plus noise, sizes 240-400 px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tint = rng.uniform(0, 255, size=(classes, 3))
    for i in range(n):
        c = i % classes
        split = "test" if (i // classes) % 5 == 0 else "train"
        h, w = rng.integers(240, 401, size=2)
        coarse = rng.uniform(0, 255, size=(4, 4, 3))
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((int(w), int(h)), Image.BICUBIC), float)
        pixels = 0.5 * field + 0.5 * tint[c] + rng.normal(0, 12, size=field.shape)
        folder = root / split / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def bare_forward(backbone, device: torch.device, batch_size: int, batches: int, amp: bool) -> float:
    """img/s of forward_features + pre-logits on pre-made channels_last tensors already on ``device``."""
    size = backbone.data_config["input_size"]
    x = torch.randn(batch_size, *size, device=device).contiguous(memory_format=torch.channels_last)
    model = backbone.model.to(device, memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
            model.forward_head(model.forward_features(x), pre_logits=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.forward_head(model.forward_features(x), pre_logits=True)
        _sync(device)
    return batch_size * batches / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bare-batches", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers here as JSON")
    args = parser.parse_args()

    from vtbench.device import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="vt-gpu-paths-") as tmp:
        report = measure(args, device, Path(tmp))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def measure(args, device: torch.device, work: Path) -> dict:
    """Every measurement of the module doc, in order, with its data under ``work``."""
    from vtbench.extract import extract
    from vtbench.fewshot import episode_accuracies
    from vtbench.fewshot.samplers import MetaDatasetSampler, sample_episodes
    from vtbench.models import create_backbone
    from vtbench.tokens import parse_spec
    from vtbench.transfer import run_probe
    from vtbench.cache import CacheSet

    report: dict = {
        "model": args.model, "weights": "random", "device": str(device), "batch_size": args.batch_size,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
    }
    dataset = f"imagefolder:{work / 'images'}"
    _, report["write_images_s"] = timed(lambda: write_images(work / "images", args.images, args.classes))
    print(f"{args.images} JPEGs written in {report['write_images_s']:.1f}s under {work}", flush=True)

    backbone = create_backbone(args.model, "random", device=device)
    report["bare_fp32_img_s"] = bare_forward(backbone, device, args.batch_size, args.bare_batches, amp=False)
    report["bare_bf16_img_s"] = bare_forward(backbone, device, args.batch_size, args.bare_batches, amp=True)
    print(f"bare forward: fp32 {report['bare_fp32_img_s']:.0f} img/s, bf16 {report['bare_bf16_img_s']:.0f} img/s",
          flush=True)

    reports, seconds = timed(lambda: extract(backbone, dataset, ["train", "test"], cache_dir=work / "cache",
                                             batch_size=args.batch_size, device=str(device), progress=False))
    report["extract_img_s"] = sum(r.n for r in reports) / seconds
    report["extract_over_bare_bf16"] = report["extract_img_s"] / report["bare_bf16_img_s"]
    print(f"vt extract end to end: {report['extract_img_s']:.0f} img/s "
          f"({report['extract_over_bare_bf16']:.3f} of the bf16 bare forward)", flush=True)

    spec = "cls[-1]" if "cls" in backbone.layout else "prelogits"
    report["tokens"] = spec
    for name, dev in (("device", str(device)), ("cpu", "cpu")):
        records, seconds = timed(lambda: run_probe(args.model, dataset, [spec], ["default", "knn"],
                                                   cache_dir=work / "cache", results_dir=work / f"results-{name}",
                                                   device=dev))
        report[f"probe_{name}_s"] = seconds
        report[f"probe_{name}_top1"] = {r["protocol"]: r["metrics"]["top1"] for r in records}
    print(f"probe default+knn: {report['probe_device_s']:.2f}s on {device}, {report['probe_cpu_s']:.2f}s on the CPU",
          flush=True)

    caches = CacheSet(args.model, dataset, cache_dir=work / "cache")
    pool = caches.split(["train", "test"])
    features, labels = pool.features(parse_spec(spec)), pool.labels
    caches.close()
    episodes = sample_episodes(labels, sorted(set(labels.tolist())), MetaDatasetSampler(), args.episodes, seed=0)
    for name, dev in (("device", str(device)), ("cpu", "cpu")):
        episode_accuracies(features, episodes[:4], "lr", device=dev)  # warm-up
        scores, seconds = timed(lambda: episode_accuracies(features, episodes, "lr", device=dev))
        report[f"fewshot_md_lr_{name}_s"] = seconds
        report[f"fewshot_md_lr_{name}_accuracy"] = 100 * float(scores.accuracy.mean())
    print(f"few-shot md lr, {args.episodes} episodes: {report['fewshot_md_lr_device_s']:.2f}s on {device}, "
          f"{report['fewshot_md_lr_cpu_s']:.2f}s on the CPU; accuracy {report['fewshot_md_lr_device_accuracy']:.2f} "
          f"vs {report['fewshot_md_lr_cpu_accuracy']:.2f}%", flush=True)
    return report


if __name__ == "__main__":
    main()
