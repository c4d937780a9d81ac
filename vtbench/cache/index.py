"""What is cached under a root: every ``.h5`` file with its metadata, read once.

Opening an HDF5 file for its attributes costs milliseconds; a lookup that opened every file of a root
with hundreds of caches cost a second per command (docs/benchmarks.md, "Cache start-up"). The index
keeps each file's metadata keyed by its path, size and modification time, in memory for the process and
in ``<root>/.vt-index.json`` between processes; a file is opened again only when it changed. The index
file is a cache of what the ``.h5`` files say, never the truth: a missing, stale or unreadable index
only costs the opens, and a root that cannot be written to works without one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from vtbench.cache.store import FORMAT, read_meta

INDEX_NAME = ".vt-index.json"
INDEX_VERSION = 1
NOT_A_CACHE = "not a vtbench cache"

_memory: dict[str, dict] = {}  # resolved root -> {relative path: entry}


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_entry(path: Path, stamp: list[int]) -> dict:
    """``{"stamp", "meta"}`` of a cache file, or ``{"stamp", "error"}`` for one that is not a readable cache."""
    try:
        with h5py.File(path, "r") as f:
            meta = read_meta(f)
    except OSError as exc:
        return {"stamp": stamp, "error": f"unreadable: {exc}"}
    if meta.get("format") != FORMAT:
        return {"stamp": stamp, "error": NOT_A_CACHE}
    return {"stamp": stamp, "meta": meta}


def _load_index(root: Path) -> dict:
    try:
        doc = json.loads((root / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("entries", {}) if doc.get("version") == INDEX_VERSION else {}


def _save_index(root: Path, entries: dict) -> None:
    from vtbench.paths import atomic_write_bytes

    blob = json.dumps({"version": INDEX_VERSION, "entries": entries}, sort_keys=True, default=str).encode()
    try:
        atomic_write_bytes(root / INDEX_NAME, blob)
    except OSError:
        pass  # a read-only root: the next process opens the files again


def scan(root: str | os.PathLike) -> dict[Path, dict]:
    """``{path: entry}`` for every ``.h5`` file under ``root``; only new or changed files are opened."""
    root = Path(root)
    if not root.exists():
        return {}
    key = str(root.resolve())
    known = _memory.get(key)
    if known is None:
        known = _load_index(root)
    entries, changed = {}, False
    for path in root.rglob("*.h5"):
        rel = str(path.relative_to(root))
        stamp = _stamp(path)
        if stamp is None:  # removed while listing
            continue
        entry = known.get(rel)
        if entry is None or entry.get("stamp") != stamp:
            entry, changed = _read_entry(path, stamp), True
        entries[rel] = entry
    changed = changed or set(entries) != set(known)
    _memory[key] = entries
    if changed:
        _save_index(root, entries)
    return {root / rel: entry for rel, entry in entries.items()}


def list_caches(root: str | os.PathLike, include_partial: bool = False) -> list[tuple[Path, dict]]:
    """Every cache file under ``root`` with its metadata, newest first."""
    found = [(path, entry["meta"]) for path, entry in scan(root).items() if "meta" in entry
             and (include_partial or not path.name.endswith(".partial.h5"))]
    found.sort(key=lambda pm: (str(pm[1].get("created", "")), str(pm[0])), reverse=True)
    return found


def unreadable_caches(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``.h5`` files under ``root`` that are not readable vtbench caches (zero-byte, truncated, foreign), with why."""
    return sorted((path, entry["error"]) for path, entry in scan(root).items() if "error" in entry)
