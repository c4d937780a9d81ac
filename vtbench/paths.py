"""Where vtbench keeps things: feature caches, results and dataset roots."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(out: str | os.PathLike | None = None) -> Path:
    """Feature-cache directory: ``out`` if given, else ``$VT_CACHE``, else the user cache dir."""
    if out:
        return Path(out).expanduser()
    if os.environ.get("VT_CACHE"):
        return Path(os.environ["VT_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vtbench")) / "features"


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """Results-store directory: ``out`` if given, else ``$VT_RESULTS``, else ``./results``."""
    if out:
        return Path(out).expanduser()
    return Path(os.environ.get("VT_RESULTS", "results")).expanduser()


def data_root(dataset_name: str, root: str | os.PathLike | None = None) -> Path | None:
    """Dataset root: ``root`` if given, else ``$VT_DATA/<dataset_name>``, else None."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("VT_DATA"):
        return Path(os.environ["VT_DATA"]).expanduser() / dataset_name
    return None


def writable_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` if it is a folder that takes new files, or could be made as one; else a one-line VTError
    naming ``option`` and the path. Nothing is created. Called before any work, so an unwritable output
    fails in a second, not after the extraction it would have stored."""
    from vtbench.errors import VTError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise VTError(f"{option} {path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise VTError(f"{option} {path}: cannot be made, {existing} is a file")
    try:
        probe = existing / f".vt-write-check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise VTError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
