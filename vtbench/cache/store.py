"""The HDF5 feature cache file: one per (model, weights, extraction settings, dataset, split).

Layout (documented for h5py-only readers in ``docs/cache_schema.md``)::

    /features/<kind>/<block>   (N, D) float16 or float32; kind in cls|patch|stage|prelogits,
                               block a zero-padded index ("000", "001", ...)
    /labels                    (N,) int64
    /image_ids                 (N,) utf-8 strings
    /class_names               (C,) utf-8 strings
    /row_status                (N,) uint8: 0 not yet written, 1 written, 2 skipped (bad image)
    /skipped/image_id, /skipped/error   the skipped images and why (on complete files)

Crash safety: every dataset is allocated when the file is created, so later
writes only touch raw data, never HDF5 metadata. Rows are marked written in
``row_status`` only after their features have been flushed, so a run killed at
any moment (even ``kill -9``) leaves a file whose marked rows are correct. The
file lives at ``<name>.partial.h5`` until it is complete, then is renamed to
``<name>.h5``; a partial file is never opened as complete. One process at a
time writes a cache (:class:`CacheLock`); another that wants the same cache
waits for it, then reuses what it made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from vtbench.errors import VTError
from vtbench.settings import FeatureSettings
from vtbench.tokens import TokenSpec, parse_spec

FORMAT = "vtbench-cache"
FORMAT_VERSION = 1
MAX_CHUNK_BYTES = 1 << 20

PENDING, WRITTEN, SKIPPED = 0, 1, 2
SKIPPED_LISTED = 20  # skipped image ids a result record lists per cache (the count is always complete)

# Attributes that decide a cache's identity: two runs that agree on all of these
# produce the same numbers, and only then is a cache reused.
# The extraction settings among them are FeatureSettings.FIELDS; the perturbation counts only where
# there is one, so that a clean cache keeps the key it had before perturbations existed.
IDENTITY_FIELDS = (
    "format_version", "model", "model_kwargs", "weights_sha256", "dataset", "split", "data_fingerprint",
    "token_kinds", "timm_version", "torch_version", *FeatureSettings.FIELDS,
)
OPTIONAL_IDENTITY = ("perturbation",)
# Attributes stored as JSON strings (everything else is a plain string or number).
JSON_FIELDS = ("model_kwargs", "transform", "kinds", "dims", "versions", "token_kinds", "perturbation")


def cache_key(meta: dict) -> str:
    """sha256 over the identity fields of ``meta`` (canonical JSON)."""
    missing = [f for f in IDENTITY_FIELDS if f not in meta and f not in OPTIONAL_IDENTITY]
    if missing:
        raise ValueError(f"cache metadata lacks identity fields: {missing}")
    identity = {f: meta[f] for f in IDENTITY_FIELDS if f in meta and not (f in OPTIONAL_IDENTITY and not meta[f])}
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _slug(text: str, limit: int = 64) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    if len(slug) > limit or slug != text:
        # Paths inside specs (imagefolder:/a/b) make poor names; keep them unique.
        slug = f"{slug[: limit - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return slug


def cache_path(root: str | os.PathLike, meta: dict) -> Path:
    """Where the cache for ``meta`` lives: ``root/<model>/<dataset>/<split>-<key16>.h5``."""
    key = meta.get("key") or cache_key(meta)
    return Path(root) / _slug(meta["model"]) / _slug(meta["dataset"]) / f"{_slug(meta['split'])}-{key[:16]}.h5"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name[: -len(".h5")] + ".partial.h5")


def _encode_attr(name: str, value):
    if name in JSON_FIELDS:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return np.bool_(value)
    return value


def _decode_attr(name: str, value):
    if isinstance(value, bytes):
        value = value.decode()
    if name in JSON_FIELDS and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_meta(h5file: h5py.File) -> dict:
    return {k: _decode_attr(k, v) for k, v in h5file.attrs.items()}


def block_name(block: int) -> str:
    return f"{block:03d}"


@dataclass(frozen=True)
class Layout:
    """What a cache holds: for each kind, the feature dim of every block; and the per-row records of its
    perturbation (``{name: (width, dtype)}``, e.g. the dropped cells), stored under ``/perturbation``."""

    dims: dict[str, list[int]]
    records: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def kinds(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.dims.items()}

    def datasets(self) -> Iterable[tuple[str, int, int]]:
        for kind, dims in self.dims.items():
            for block, dim in enumerate(dims):
                yield kind, block, dim


class CacheWriter:
    """Creates (or resumes) one partial cache file and streams rows into it.

    Use :meth:`write` for each batch, :meth:`commit` to make written rows
    durable, and :meth:`finalize` once every row is written or skipped.
    Rows must be written in batches aligned to ``batch_size`` so that a resumed
    run recomputes exactly the batches an uninterrupted run would.
    """

    def __init__(self, final: Path, f: h5py.File, batch_size: int):
        self.final = final
        self.partial = partial_path(final)
        self._f = f
        self.batch_size = batch_size
        self.n = int(f.attrs["n"])
        self._features = {
            (kind, int(block)): ds for kind, grp in f["features"].items() for block, ds in grp.items()
        }
        self._records = dict(f["perturbation"].items()) if "perturbation" in f else {}
        self._status = f["row_status"]
        self._pending: list[tuple[int, np.ndarray]] = []
        self._skipped_log = self.partial.with_name(self.partial.name + ".skipped.jsonl")

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        meta: dict,
        layout: Layout,
        labels: np.ndarray,
        image_ids: list[str],
        class_names: list[str],
        batch_size: int,
    ) -> "CacheWriter":
        """Resume the partial file for ``meta`` if one exists, else create it."""
        meta = dict(meta, key=meta.get("key") or cache_key(meta))
        final = cache_path(root, meta)
        partial = partial_path(final)
        if partial.exists():
            try:
                f = h5py.File(partial, "r+")
                stored = read_meta(f)
                if stored.get("key") == meta["key"] and stored.get("n") == len(labels):
                    return cls(final, f, int(stored["batch_size"]))
                f.close()
            except OSError:
                pass  # unreadable leftovers are recreated below
            partial.unlink()
        _create(partial, meta, layout, labels, image_ids, class_names, batch_size)
        return cls(final, h5py.File(partial, "r+"), batch_size)

    @property
    def resumed_rows(self) -> int:
        return int(np.count_nonzero(self._status[:] != PENDING))

    def pending_batches(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every batch that still has unwritten rows."""
        status = self._status[:]
        out = []
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            if np.any(status[start:stop] == PENDING):
                out.append((start, stop))
        return out

    def write(
        self,
        start: int,
        features: dict[tuple[str, int], np.ndarray],
        skipped: dict[int, str] | None = None,
        records: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write rows ``start..start+len`` of every (kind, block) and perturbation record; ``skipped`` maps
        row -> error."""
        rows = write_rows(self._features, self._records, start, features, records)
        status = np.full(rows, WRITTEN, dtype=np.uint8)
        if skipped:
            status[[r - start for r in skipped]] = SKIPPED
            with open(self._skipped_log, "a") as log:
                for row, error in skipped.items():
                    log.write(json.dumps({"row": int(row), "error": error}) + "\n")
        self._pending.append((start, status))

    def commit(self) -> None:
        """Make every row written so far durable: flush features first, then mark them."""
        commit_rows(self._f, self._status, self._pending)

    def finalize(self) -> Path:
        """Record skipped images, mark the file complete and move it to its final name."""
        self.commit()
        status = self._status[:]
        if np.any(status == PENDING):
            raise RuntimeError(f"{np.count_nonzero(status == PENDING)} rows were never written")
        errors: dict[int, str] = {}
        if self._skipped_log.exists():
            for line in self._skipped_log.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    errors[rec["row"]] = rec["error"]
        skipped_rows = np.flatnonzero(status == SKIPPED)
        ids = self._f["image_ids"]
        grp = self._f.require_group("skipped")
        for name in list(grp):
            del grp[name]
        strs = h5py.string_dtype()
        grp.create_dataset("image_id", data=[ids[r].decode() for r in skipped_rows], dtype=strs)
        grp.create_dataset("error", data=[errors.get(int(r), "unreadable image") for r in skipped_rows], dtype=strs)
        self._f.attrs["n_skipped"] = len(skipped_rows)
        self._f.attrs["completed"] = _now()
        self._f.attrs["status"] = "complete"
        self._f.flush()
        self._f.close()
        with open(self.partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.final)
        self._skipped_log.unlink(missing_ok=True)
        return self.final

    def close(self) -> None:
        """Commit what was written and close, leaving the partial file to resume from."""
        if self._f.id.valid:
            self.commit()
            self._f.close()


def write_rows(features: dict, records: dict, at: int, values: dict, record_values: dict | None) -> int:
    """One batch into its datasets at row ``at``: every (kind, block) of ``values`` and every perturbation record;
    returns the number of rows. Their status is set later, by :func:`commit_rows`."""
    rows = None
    for key, ds in features.items():
        arr = values[key]
        rows = len(arr)
        ds[at : at + rows] = arr.astype(ds.dtype, copy=False)
    for name, ds in records.items():
        ds[at : at + rows] = np.asarray(record_values[name]).astype(ds.dtype, copy=False)
    return rows


def commit_rows(f: h5py.File, status_ds, pending: list[tuple[int, np.ndarray]]) -> None:
    """Make the written rows durable: flush their data first, then mark their status, so a kill at any moment
    leaves only marked rows that are whole (``pending``: (first row, statuses), emptied)."""
    if not pending:
        return
    f.flush()
    for at, status in pending:
        status_ds[at : at + len(status)] = status
    f.flush()
    pending.clear()


class CacheLock:
    """An exclusive lock on one cache path, held by the process that creates, resumes or replaces it.

    ``fcntl.flock`` on a hidden file beside the cache (``.<name>.h5.lock``, holding the owner's
    pid), removed on release. The lock dies with its process, so a killed run never leaves a
    stale one. Without it, a second ``vt extract`` of the same cache would take the first one's
    partial file for an unreadable leftover and delete it. Where ``fcntl`` is missing (Windows)
    nothing is locked.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.name}.lock")
        self._fd: int | None = None

    def acquire(self, on_wait=None) -> "CacheLock":
        """Take the lock, waiting for its holder; ``on_wait(message)`` is called once if it has to wait."""
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    on_wait(f"waiting for another process (pid {holder}) that is writing {self.final}")
                    on_wait = None
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder removes the file before unlocking: lock the file that is on disk now.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        if self._fd is None:
            return
        import fcntl

        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a stale file and retries
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, MAX_CHUNK_BYTES // max(1, row_bytes)))


def _create(partial, meta, layout, labels, image_ids, class_names, batch_size) -> None:
    """Write the whole file structure under a temporary name, then move it into place."""
    n = len(labels)
    dtype = np.dtype(meta["dtype"])
    partial.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial.with_name(f".{partial.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        attrs = dict(meta, format=FORMAT, n=n, batch_size=batch_size, status="partial", created=_now(),
                     kinds=layout.kinds, dims=layout.dims, num_classes=len(class_names))
        for name, value in attrs.items():
            f.attrs[name] = _encode_attr(name, value)
        feats = f.create_group("features")
        for kind, block, dim in layout.datasets():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            # Allocating every chunk now means later writes never change file metadata.
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            feats.require_group(kind).create_dataset(
                block_name(block), shape=(n, dim), dtype=dtype,
                chunks=(_chunk_rows(n, dim * dtype.itemsize), dim), dcpl=dcpl, track_times=False,
            )
        for name, (width, rec_dtype) in layout.records.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            f.require_group("perturbation").create_dataset(
                name, shape=(n, width), dtype=np.dtype(rec_dtype),
                chunks=(_chunk_rows(n, width * np.dtype(rec_dtype).itemsize), width), dcpl=dcpl, track_times=False)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset("row_status", shape=(n,), dtype=np.uint8, chunks=(_chunk_rows(n, 1),),
                         fillvalue=PENDING, dcpl=dcpl, track_times=False)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("image_ids", data=list(image_ids), dtype=h5py.string_dtype())
        f.create_dataset("class_names", data=list(class_names), dtype=h5py.string_dtype())
    os.replace(tmp, partial)


class FeatureCache:
    """Read access to one complete cache file (see :func:`open_cache`).

    Only rows that were written are exposed: images skipped as unreadable are
    left out of ``labels``, ``image_ids`` and every feature array alike.
    """

    def __init__(self, path: str | os.PathLike, allow_partial: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise VTError(f"no cache file at {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise VTError(f"cannot read cache {self.path}: {exc}") from None
        self.meta = read_meta(self._f)
        if self.meta.get("format") != FORMAT:
            self._f.close()
            raise VTError(f"{self.path} is not a vtbench cache")
        if self.meta.get("status") != "complete" and not allow_partial:
            self._f.close()
            raise VTError(f"cache {self.path} is partial (an interrupted extract); rerun the same 'vt extract' to finish it")
        status = self._f["row_status"][:]
        self._rows = np.flatnonzero(status == WRITTEN)
        self._all_rows = len(self._rows) == len(status)
        self.labels = self._f["labels"][:][self._rows]
        self.class_names = [s.decode() for s in self._f["class_names"][:]]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def settings(self) -> FeatureSettings:
        return FeatureSettings.of(self.meta)

    @property
    def kinds(self) -> dict[str, int]:
        """``{kind: number of blocks}``, e.g. ``{"cls": 12, "patch": 12, "prelogits": 1}``."""
        return dict(self.meta["kinds"])

    @property
    def image_ids(self) -> list[str]:
        ids = self._f["image_ids"][:]
        return [ids[r].decode() for r in self._rows]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(image_id, error)`` for every image that could not be read."""
        if "skipped" not in self._f:
            return []
        grp = self._f["skipped"]
        return [(i.decode(), e.decode()) for i, e in zip(grp["image_id"][:], grp["error"][:])]

    def record_ref(self, split: str | None = None) -> dict:
        """What a result record says of this cache: key, path, split, and which images it holds (root, data
        fingerprint, rows, skipped images: the first SKIPPED_LISTED ids, and their count)."""
        skipped = self.skipped
        return {"key": self.key, "path": str(self.path), "split": split or self.meta["split"],
                "dataset": self.meta["dataset"],
                "data_fingerprint": self.meta.get("data_fingerprint"), "dataset_root": self.meta.get("dataset_root"),
                "rows": len(self), "n_skipped": len(skipped), "skipped": [i for i, _ in skipped[:SKIPPED_LISTED]]}

    def block(self, kind: str, block: int, dtype=np.float32) -> np.ndarray:
        """Features of one (kind, block) for every written row, as ``(N, D)``."""
        nblocks = self.kinds.get(kind)
        if nblocks is None:
            raise VTError(f"cache {self.path.name} has no '{kind}' features (it has: {', '.join(self.kinds)})")
        if not -nblocks <= block < nblocks:
            raise VTError(f"block {block} is out of range for '{kind}' ({nblocks} blocks)")
        arr = self._f["features"][kind][block_name(block % nblocks)][:]
        if not self._all_rows:
            arr = arr[self._rows]
        return arr.astype(dtype, copy=False)

    def block_rows(self, kind: str, block: int, start, stop: int | None = None, dtype=np.float64) -> np.ndarray:
        """Rows ``start:stop`` of the written rows of one (kind, block), or the written rows at the indices
        ``start`` (an array): what streamed passes read, a chunk at a time."""
        nblocks = self.kinds[kind]
        ds = self._f["features"][kind][block_name(block % nblocks)]
        rows = self._rows[start:stop] if stop is not None else self._rows[np.asarray(start)]
        if len(rows) == 0:
            return np.zeros((0, ds.shape[1]), dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return ds[lo:hi][rows - lo].astype(dtype, copy=False)

    def perturbation_record(self, name: str) -> np.ndarray:
        """What the perturbation did to every written row (``dropped_cells``, ``permutation``, ``dropped_tokens``)."""
        if "perturbation" not in self._f or name not in self._f["perturbation"]:
            have = list(self._f["perturbation"]) if "perturbation" in self._f else []
            raise VTError(f"cache {self.path.name} has no perturbation record '{name}' (it has: {', '.join(have) or 'none'})")
        arr = self._f["perturbation"][name][:]
        return arr if self._all_rows else arr[self._rows]

    def features(self, spec: str | TokenSpec, dtype=np.float32) -> np.ndarray:
        """Concatenated features for a token spec (e.g. ``cls[-4:]``); reads only the blocks it needs."""
        pairs = parse_spec(spec).resolve(self.kinds)
        parts = [self.block(kind, block, dtype) for kind, block in pairs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def __repr__(self) -> str:
        m = self.meta
        return f"FeatureCache({m['model']} on {m['dataset']}/{m['split']}, n={len(self)}, kinds={self.kinds})"


def open_cache(path: str | os.PathLike, allow_partial: bool = False) -> FeatureCache:
    """Open a cache file for reading: tokens by kind and block as numpy, labels, class names, metadata."""
    return FeatureCache(path, allow_partial=allow_partial)


def write_cache(
    root: str | os.PathLike,
    meta: dict,
    features: dict[tuple[str, int], np.ndarray],
    labels,
    image_ids: list[str],
    class_names: list[str],
    skipped: dict[int, str] | None = None,
) -> Path:
    """Write a complete cache from in-memory arrays (``{(kind, block): (N, D)}``); returns its path.

    ``meta`` needs the identity fields (see ``IDENTITY_FIELDS``) plus any extra
    attributes to record. Useful for importing features computed elsewhere.
    """
    dims: dict[str, list[int]] = {}
    for kind, block in sorted(features):
        dims.setdefault(kind, []).append(features[(kind, block)].shape[1])
    for kind, blocks in dims.items():
        if sorted(b for k, b in features if k == kind) != list(range(len(blocks))):
            raise ValueError(f"blocks of '{kind}' must be numbered 0..{len(blocks) - 1}")
    n = len(labels)
    meta = dict(meta)
    meta.setdefault("token_kinds", sorted(dims))
    meta.setdefault("precision", "fp32")
    writer = CacheWriter.open(root, meta, Layout(dims), np.asarray(labels), image_ids, class_names, batch_size=max(1, n))
    writer.write(0, features, skipped)
    return writer.finalize()


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Check one cache file end to end; returns the problems found (empty when it is sound).

    Checks the format and completeness, that the stored key matches its identity
    fields, that every row is written or listed as skipped, that datasets have
    the recorded shapes and chunking, and that every written feature is finite.
    """
    path = Path(path)
    problems = []
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        return [f"unreadable: {exc}"]
    with f:
        meta = read_meta(f)
        if meta.get("format") != FORMAT:
            return ["not a vtbench cache"]
        if meta.get("status") != "complete":
            problems.append(f"status is {meta.get('status')!r}, not complete")
        try:
            if cache_key(meta) != meta.get("key"):
                problems.append("stored key does not match the identity fields (metadata was edited?)")
        except ValueError as exc:
            problems.append(str(exc))
        if path.name.endswith(".h5") and not path.name.endswith(".partial.h5") and meta.get("key", "")[:16] not in path.name:
            problems.append("file name does not carry the key")
        n = int(meta.get("n", -1))
        status = f["row_status"][:]
        if len(status) != n:
            problems.append(f"row_status has {len(status)} rows, expected {n}")
        pending = int(np.count_nonzero(status == PENDING))
        if pending:
            problems.append(f"{pending} rows were never written")
        n_skipped = int(np.count_nonzero(status == SKIPPED))
        listed = len(f["skipped/image_id"]) if "skipped" in f else 0
        if n_skipped != listed:
            problems.append(f"{n_skipped} rows marked skipped but {listed} listed")
        labels = f["labels"][:]
        if len(labels) != n or (n and (labels.min() < 0 or labels.max() >= len(f["class_names"]))):
            problems.append("labels missing or out of range")
        if len(f["image_ids"]) != n:
            problems.append("image_ids length differs from n")
        written = status == WRITTEN
        for kind, dims in meta.get("dims", {}).items():
            for block, dim in enumerate(dims):
                name = f"features/{kind}/{block_name(block)}"
                if name not in f:
                    problems.append(f"missing {name}")
                    continue
                ds = f[name]
                if ds.shape != (n, dim):
                    problems.append(f"{name} has shape {ds.shape}, expected {(n, dim)}")
                if ds.chunks and int(np.prod(ds.chunks)) * ds.dtype.itemsize > MAX_CHUNK_BYTES:
                    problems.append(f"{name} chunks exceed 1 MiB")
                if str(ds.dtype) != meta.get("dtype"):
                    problems.append(f"{name} is {ds.dtype}, expected {meta.get('dtype')}")
                if not np.isfinite(ds[:][written]).all():
                    problems.append(f"{name} holds non-finite values")
    return problems
