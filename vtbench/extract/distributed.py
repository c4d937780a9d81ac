"""Sharded extraction on torch.distributed: `torchrun --nproc_per_node=N -m vtbench extract ARGS`.

Every rank plans the same caches. For each cache, the batches not yet written by any earlier shard file
(of this run or an interrupted one, whatever its number of ranks) are split into contiguous shares, one
per rank; each rank writes its share into a shard file of its own beside the cache
(``<split>-<key16>.shard-<id>.h5``: the share's rows, their global indices and a row status, crash-safe
like a partial cache). Once every rank is done (a barrier with a timeout), rank 0 merges the shard files
into the one final cache through the ordinary cache writer, verifies it, and removes the shards. A rerun
after a crash or ``kill -9`` resumes from every row any shard had committed. A rank that fails makes
the others stop at the next barrier with one line naming it, not hang.

Ranks decode and forward on their own device (``cuda:LOCAL_RANK`` with NCCL on GPUs, the CPU with gloo);
barriers use a gloo group everywhere, so that their timeout and the failed rank's name work on both.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np

from vtbench.cache.store import PENDING, SKIPPED, WRITTEN, CacheWriter, Layout, block_name, commit_rows, write_rows
from vtbench.errors import VTError

TIMEOUT_S = float(os.environ.get("VT_DIST_TIMEOUT_S", "1800"))  # how long a rank waits for the others


@dataclass
class Ranks:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    group: object = None  # the gloo group barriers use

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str) -> None:
        if self.world == 1:  # one process finishing the shards of an earlier job
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=TIMEOUT_S), wait_all_ranks=True)
        except RuntimeError as exc:
            raise VTError(f"rank {self.rank}: stopped while waiting for the other ranks ({what}): "
                          f"{_first_sentence(exc)}") from None


def _first_sentence(exc: Exception) -> str:
    """gloo's reason without its source location and advice: "Connection closed by peer [host]:port"."""
    text = (str(exc).strip().splitlines() or ["a peer did not arrive"])[0]
    text = re.sub(r"^\[[^\]]*\]:?\s*", "", text)
    return re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")


def ranks_from_env() -> Ranks | None:
    """The job's ranks when launched by torchrun (WORLD_SIZE > 1), with the process group started; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not torch.cuda.is_available():  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Ranks(rank, world, local, group)


def device_for(ranks: Ranks, device: str | None) -> str | None:
    """The rank's device: its own GPU (``LOCAL_RANK``) when on CUDA."""
    import torch

    if (device in (None, "auto", "cuda")) and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def shard_files(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f"{final.name[:-len('.h5')]}.shard-*.h5"))


def written_rows(final: Path, n: int) -> np.ndarray:
    """Which rows some shard file of ``final`` has committed (written or skipped)."""
    done = np.zeros(n, dtype=bool)
    for path in shard_files(final):
        try:
            with h5py.File(path, "r") as f:
                status = f["row_status"][:]
                done[f["rows"][:][status != PENDING]] = True
        except (OSError, KeyError):
            continue  # a shard file torn at creation holds nothing committed
    return done


def share(done: np.ndarray, batch_size: int, ranks: Ranks) -> list[tuple[int, int]]:
    """This rank's contiguous share of the batches not all ``done`` (``written_rows``)."""
    n = len(done)
    pending = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)
               if not done[start:min(start + batch_size, n)].all()]
    lo, hi = len(pending) * ranks.rank // ranks.world, len(pending) * (ranks.rank + 1) // ranks.world
    return pending[lo:hi]


class ShardWriter:
    """The rows of some batches of one cache, in a shard file: the cache writer's interface, so the extraction
    loop writes shards as it writes caches."""

    def __init__(self, final: Path, layout: Layout, dtype: str, batches: list[tuple[int, int]], batch_size: int):
        self.final, self.batch_size = final, batch_size
        ident = hashlib.sha256(repr(batches).encode()).hexdigest()[:12]
        self.path = final.with_name(f"{final.name[:-len('.h5')]}.shard-{ident}.h5")
        self.partial = self.path
        rows = np.concatenate([np.arange(a, b) for a, b in batches]) if batches else np.zeros(0, np.int64)
        self._offset, local = {}, 0
        for a, b in batches:
            self._offset[a] = local
            local += b - a
        self._batches = batches
        self._create(layout, dtype, rows)
        self._f = h5py.File(self.path, "r+")
        self._features = {(k, int(b)): ds for k, grp in self._f["features"].items() for b, ds in grp.items()}
        self._records = dict(self._f["perturbation"].items()) if "perturbation" in self._f else {}
        self._status, self._errors = self._f["row_status"], self._f["errors"]
        self._pending: list = []

    def _create(self, layout: Layout, dtype: str, rows: np.ndarray) -> None:
        if self.path.exists():
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            for kind, block, dim in layout.datasets():
                f.require_group("features").require_group(kind).create_dataset(
                    block_name(block), shape=(len(rows), dim), dtype=np.dtype(dtype))
            for name, (width, rec_dtype) in layout.records.items():
                f.require_group("perturbation").create_dataset(name, shape=(len(rows), width), dtype=np.dtype(rec_dtype))
            f.create_dataset("rows", data=rows.astype(np.int64))
            f.create_dataset("row_status", data=np.full(len(rows), PENDING, np.uint8))
            f.create_dataset("errors", shape=(len(rows),), dtype=h5py.string_dtype())
        os.replace(tmp, self.path)

    @property
    def resumed_rows(self) -> int:
        return int(np.count_nonzero(self._status[:] != PENDING))

    def pending_batches(self) -> list[tuple[int, int]]:
        status = self._status[:]
        return [(a, b) for a, b in self._batches if (status[self._offset[a]:self._offset[a] + b - a] == PENDING).any()]

    def write(self, start: int, features: dict, skipped: dict | None = None, records: dict | None = None) -> None:
        local = self._offset[start]
        rows = write_rows(self._features, self._records, local, features, records)
        status = np.full(rows, WRITTEN, np.uint8)
        for row, error in (skipped or {}).items():
            status[row - start] = SKIPPED
            self._errors[local + row - start] = error
        self._pending.append((local, status))

    def commit(self) -> None:
        commit_rows(self._f, self._status, self._pending)

    def finalize(self) -> Path:
        self.close()
        return self.path

    def close(self) -> None:
        if self._f.id.valid:
            self.commit()
            self._f.close()


def merge(final: Path, root, meta: dict, layout: Layout, labels, image_ids, class_names, batch_size: int) -> Path:
    """Rank 0: every committed row of the shard files into the final cache (through the cache writer, so the
    file is what a one-process run writes), finalized, verified; then the shards are removed."""
    from vtbench.cache import verify_cache

    writer = CacheWriter.open(root, meta, layout, labels, image_ids, class_names, batch_size)
    try:
        for path in shard_files(final):
            with h5py.File(path, "r") as f:  # a batch at a time: a shard may not fit in memory
                rows, status, errors = f["rows"][:], f["row_status"][:], f["errors"][:]
                feats = {(k, int(b)): ds for k, grp in f["features"].items() for b, ds in grp.items()}
                recs = dict(f["perturbation"].items()) if "perturbation" in f else {}
                for start in range(0, len(rows), batch_size):  # shards hold whole batches of the grid
                    take = slice(start, min(start + batch_size, len(rows)))
                    if (status[take] == PENDING).any():
                        continue
                    first = int(rows[take][0])
                    skipped = {int(r): (e.decode() if isinstance(e, bytes) else e) or "unreadable image"
                               for r, s, e in zip(rows[take], status[take], errors[take]) if s == SKIPPED}
                    writer.write(first, {k: v[take] for k, v in feats.items()}, skipped,
                                 {k: v[take] for k, v in recs.items()})
        out = writer.finalize()
    except RuntimeError as exc:  # rows no shard wrote
        writer.close()
        raise VTError(f"cannot merge the shards of {final.name}: {exc}; rerun the same command to finish them") from None
    problems = verify_cache(out)
    if problems:
        raise VTError(f"the merged cache {out} fails verification: {'; '.join(problems)}")
    for path in shard_files(final):
        path.unlink(missing_ok=True)
    return out
