"""The results store: one JSON file per (model, weights, dataset, tokens, protocol, variant, seed).

Every probe and few-shot run writes one record here; ``vt leaderboard`` and
:func:`load` read them back. A record carries everything needed to reproduce
its number: the caches it read (with their keys), the model and weights hash,
the token spec, protocol, seed and splits, the hyperparameter search, the
metrics, timings and library versions. Writes are atomic (write to a temporary
file, then rename), so parallel runs never leave a torn or mixed file.

Record layout (``schema: vtbench-result/1``)::

    {
      "schema": "vtbench-result/1",
      "task": "probe" | "fewshot",
      "model": "deit_small_patch16_224",
      "weights": {"source": "hub:timm/...", "sha256": "..."},
      "dataset": "dtd", "tokens": "cls[-4:]", "protocol": "default",
      "variant": "",             # protocol detail that changes the number (e.g. "lr/5w5s")
      "seed": 0,
      "splits": {"train": ["train"], "val": ["val"], "test": ["test"]},
      "caches": {"train": [{"key": ..., "path": ..., "split": ...}], "test": [...]},
      "transform": {...}, "norm": true, "dtype": "float16", "precision": "fp32",   # FeatureSettings.FIELDS
      "metrics": {"top1": 85.7, ...},          # percentages
      "selection": {...}, "solver": {...}, "timings": {...},
      "versions": {...}, "created": "..."
    }
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vtbench.paths import atomic_write_bytes
from vtbench.settings import FeatureSettings

SCHEMA = "vtbench-result/1"
IDENTITY_FIELDS = ("task", "model", "weights_sha256", "features", "data", "dataset", "tokens", "protocol", "variant",
                   "seed")


def versions() -> dict:
    """Versions of vtbench and the libraries that shape its numbers."""
    from importlib.metadata import version

    import numpy
    import torch

    import vtbench

    # timm and scikit-learn by their installed metadata: importing them just for a version takes seconds.
    return {
        "vtbench": vtbench.__version__,
        "torch": str(torch.__version__),
        "timm": version("timm"),
        "numpy": numpy.__version__,
        "sklearn": version("scikit-learn"),
    }


def new_record(task: str, meta: dict, *, protocol: str, variant: str, seed: int, caches: dict, **fields) -> dict:
    """The fields every record of ``task`` (probe, fewshot) starts with: what it was computed on (model, weights,
    dataset, extraction settings, from the metadata of its caches), by which protocol and variant, with which
    seed and caches. The task adds its own ``fields``, then tokens and outcome."""
    return {
        "task": task,
        "model": meta["model"],
        "weights": {"source": meta.get("weights_source"), "sha256": meta["weights_sha256"]},
        "dataset": meta["dataset"],
        **FeatureSettings.of(meta).fields(),
        "arch": meta.get("arch"),
        "protocol": protocol,
        "variant": variant,
        "seed": seed,
        "caches": caches,
        **fields,
    }


def convergence_note(record: dict, decisive_only: bool = False) -> str:
    """What of a logistic probe did not meet the solver's criterion, in words ('' when everything did).

    The refit gives the reported number and the chosen grid solution the selection: those are
    decisive. Other grid values that missed are only counted (``decisive_only`` leaves them out).
    """
    solver = record.get("solver", {})
    if "refit" not in solver or "selection" not in solver:
        return ""
    parts = []
    refit = solver["refit"]
    if not refit["converged"]:
        parts.append(f"refit not converged (measure {refit['grad_norm']:.1e} > {solver.get('tol', {}).get('refit', '?')})")
    converged = solver["selection"]["converged"]
    grid = record.get("selection", {}).get("grid") or []
    chosen = record.get("selection", {}).get("chosen")
    if chosen in grid and not converged[grid.index(chosen)]:
        parts.append(f"chosen l2={chosen:g} not converged in the selection")
    missed = converged.count(False)
    if missed and not decisive_only:
        parts.append(f"{missed}/{len(converged)} grid fits not converged")
    return "; ".join(parts)


def data_id(record: dict) -> str | None:
    """12 hex digits naming the images a record was computed on: the data fingerprints of its caches.

    None for records written before the caches' fingerprints were copied into them.
    """
    refs = [ref for refs in (record.get("caches") or {}).values() for ref in refs]
    if not refs or any("data_fingerprint" not in ref for ref in refs):
        return None
    pairs = sorted({(ref["split"], ref["data_fingerprint"]) for ref in refs})
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]


def data_label(record: dict) -> str:
    """Which images a record was computed on, in words: its data id and the dataset roots of its caches."""
    ident = data_id(record)
    if ident is None:
        return "data not recorded"
    roots = sorted({str(ref.get("dataset_root") or "in memory")
                    for refs in record["caches"].values() for ref in refs})
    return f"data {ident} ({', '.join(roots)})"


def identity(record: dict) -> dict:
    """The fields that name a result: one file per distinct identity (``data`` only where recorded)."""
    ident = {
        "task": record["task"],
        "model": record["model"],
        "weights_sha256": record["weights"]["sha256"],
        "features": FeatureSettings.of(record).id,
        "data": data_id(record),
        "dataset": record["dataset"],
        "tokens": record["tokens"],
        "protocol": record["protocol"],
        "variant": record.get("variant", ""),
        "seed": record["seed"],
    }
    if ident["data"] is None:  # older records keep the identity (and file name) they were stored under
        del ident["data"]
    return ident


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def result_path(root: str | os.PathLike, ident: dict) -> Path:
    """``root/<model>/<dataset>/<task>-<protocol>/<tokens>__seed<seed>__<hash>.json``."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{_safe(ident['tokens'])}__seed{ident['seed']}__{digest}.json"
    return Path(root) / _safe(ident["model"]) / _safe(ident["dataset"]) / f"{ident['task']}-{_safe(ident['protocol'])}" / name


def save(root: str | os.PathLike, record: dict) -> Path:
    """Validate and atomically write one record; returns its path."""
    record = dict(record)
    record.setdefault("schema", SCHEMA)
    record.setdefault("variant", "")
    record.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if "versions" not in record:  # versions() imports torch and timm: only when needed
        record["versions"] = versions()
    ident = identity(record)  # raises KeyError on a record missing its identity
    path = result_path(root, ident)
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n").encode())
    return path


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stored_path(root: str | os.PathLike, record: dict) -> Path | None:
    """The file that stores a result with ``record``'s identity, or None (for ``--skip-existing``).

    Also finds a record stored under the name it had before the identity named the data (then its
    caches must be the very caches of ``record``) or the extraction settings (then they must match).
    """
    ident = identity(record)
    path = result_path(root, ident)
    if path.exists():
        return path
    without_data = {k: v for k, v in ident.items() if k != "data"}
    keys = _cache_keys(record)
    for legacy in (without_data, {k: v for k, v in without_data.items() if k != "features"}):
        candidate = result_path(root, legacy)
        try:
            stored = json.loads(candidate.read_text()) if candidate.exists() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if stored is None or FeatureSettings.of(stored).id != ident["features"]:
            continue
        if "data" not in ident or (keys and _cache_keys(stored) == keys):
            return candidate
    return None


def stored_record(root: str | os.PathLike, record: dict) -> dict | None:
    """The stored result with ``record``'s identity, marked ``"skipped": True`` (what ``--skip-existing``
    returns instead of recomputing it), or None."""
    path = stored_path(root, record)
    if path is None:
        return None
    return dict(json.loads(path.read_text()), skipped=True, _path=str(path))


def _cache_keys(record: dict) -> set[str]:
    return {ref["key"] for refs in (record.get("caches") or {}).values() for ref in refs if "key" in ref}


@dataclass
class ResultsTable:
    """All records of a store, with light filtering and a pandas view."""

    records: list[dict] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # paths of .json files that are not valid JSON

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def filter(self, **equals) -> "ResultsTable":
        """Keep records whose top-level fields equal the given values (a list means any of)."""

        def keep(rec):
            for key, want in equals.items():
                if want is None:
                    continue
                allowed = want if isinstance(want, (list, tuple, set)) else [want]
                if rec.get(key) not in allowed:
                    return False
            return True

        return ResultsTable([r for r in self.records if keep(r)], self.unreadable)

    def rows(self) -> list[dict]:
        """One flat dict per record: identity fields plus every metric."""
        out = []
        for rec in self.records:
            row = identity(rec)
            row.update(rec.get("metrics", {}))
            out.append(row)
        return out

    def to_pandas(self):
        """The flat rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows())


def load(root: str | os.PathLike) -> ResultsTable:
    """Read every record under ``root`` (sorted by path, so the order is stable).

    Other JSON files (episodes files, say) are passed over; files that are not valid JSON are
    listed in ``unreadable`` (records are written atomically, so vtbench itself leaves none).
    Where two files hold the same identity (copied stores, or files written before the identity
    named the extraction settings), the newer record is kept.
    """
    root = Path(root)
    records: dict[str, dict] = {}
    unreadable = []
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            unreadable.append(str(path))
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            rec["_path"] = str(path)
            try:
                key = json.dumps(identity(rec), sort_keys=True)
            except (KeyError, TypeError, AttributeError):
                key = str(path)  # incomplete identity: kept as it is
            if key not in records or str(rec.get("created", "")) >= str(records[key].get("created", "")):
                records[key] = rec
    return ResultsTable(sorted(records.values(), key=lambda r: r["_path"]), unreadable)
