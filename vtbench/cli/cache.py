"""`vt cache ls | info | verify | rm | prune`: inspect and remove feature caches."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.errors import VTError

cache_app = typer.Typer(help="List, inspect, verify and remove feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _selected(root: Path, model, dataset, split, partial: bool = True) -> list[tuple[Path, dict]]:
    from vtbench.data import canonical_spec
    from vtbench.cache import list_caches

    dataset = canonical_spec(dataset) if dataset else None  # as caches name it: dtd -> dtd:1
    return [(p, m) for p, m in list_caches(root, include_partial=partial)
            if (model is None or m.get("model") == model) and (dataset is None or m.get("dataset") == dataset)
            and (split is None or m.get("split") == split)]


def _rows_written(path: Path, meta: dict) -> tuple[int, int]:
    """(rows written or skipped, total rows): partial files are counted from their row status."""
    n = int(meta.get("n", 0))
    if meta.get("status") == "complete":
        return n, n
    import h5py
    import numpy as np

    from vtbench.cache.store import PENDING

    with h5py.File(path, "r") as f:
        return int(np.count_nonzero(f["row_status"][:] != PENDING)), n


@cache_app.command("ls")
def ls(
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: $VT_CACHE or the user cache dir)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only this dataset spec (e.g. dtd, gtsrb)."),
    partial: bool = typer.Option(True, "--partial/--no-partial", help="Also list interrupted (partial) runs."),
) -> None:
    """List caches: status, model, dataset/split, kinds, rows written/total, skipped, root, date, size, settings.
    Unreadable .h5 files are listed as FAIL (exit 1)."""
    from vtbench.cache import unreadable_caches
    from vtbench.data import canonical_spec
    from vtbench.paths import cache_dir
    from vtbench.perturb.spec import label

    root = cache_dir(out)
    dataset = canonical_spec(dataset) if dataset else None  # as caches name it: dtd -> dtd:1
    rows = _selected(root, model, dataset, None, partial)
    broken = unreadable_caches(root) if model is None and dataset is None else []
    if not rows and not broken:
        which = " and ".join(f"{k} {v}" for k, v in (("model", model), ("dataset", dataset)) if v)
        typer.echo(f"no caches{' for ' + which if which else ''} under {root}")
        return
    typer.echo(f"{len(rows)} cache(s) under {root}")
    for path, m in rows:
        done, total = _rows_written(path, m)
        kinds = ",".join(f"{k}x{n}" for k, n in (m.get("kinds") or {}).items())
        typer.echo(
            f"{m.get('status', '?'):8s} {m.get('model')}  {m.get('dataset')}/{m.get('split')}  {kinds}  "
            f"rows {done}/{total}  skipped {m.get('n_skipped', 0) or 0}  root {m.get('dataset_root') or '-'}  "
            f"{str(m.get('completed') or m.get('created', '?'))[:16]}  {_size(path)}  "
            f"weights={str(m.get('weights_sha256', ''))[:12]}  transform={m.get('transform', {}).get('mode', '?')}  "
            f"norm={m.get('norm')}  {m.get('dtype')}  "
            + (f"perturb={label(m['perturbation'])}  " if m.get("perturbation") else "")
            + f"{path.relative_to(root)}"
        )
    for path, why in broken:
        typer.echo(f"FAIL     {path.relative_to(root)}: {why} (remove it with 'vt cache prune')")
    if broken:
        raise typer.Exit(1)


@cache_app.command("info")
def info(path: Path = typer.Argument(..., help="A cache file.")) -> None:
    """Show a cache's metadata and its datasets."""
    import h5py

    from vtbench.cache.store import read_meta

    if not path.exists():
        raise VTError(f"no cache file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VTError(f"cannot read {path}: {exc}") from None
    with f:
        meta = read_meta(f)
        for key in sorted(meta):
            typer.echo(f"{key}: {meta[key]}")
        typer.echo("datasets:")
        f.visititems(lambda name, obj: typer.echo(f"  /{name} {obj.shape} {obj.dtype}")
                     if isinstance(obj, h5py.Dataset) else None)
        if "skipped" in f and len(f["skipped/image_id"]):
            typer.echo("skipped images:")
            for image_id, error in zip(f["skipped/image_id"][:], f["skipped/error"][:]):
                typer.echo(f"  {image_id.decode()}: {error.decode()}")


@cache_app.command("verify")
def verify(
    paths: Optional[List[Path]] = typer.Argument(None, help="Cache files (default: every cache under --out)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory to verify when no paths are given."),
) -> None:
    """Check caches end to end (key, completeness, shapes, chunking, finite values). Exit 1 if any fails."""
    from vtbench.cache import list_caches, unreadable_caches, verify_cache
    from vtbench.paths import cache_dir

    targets = list(paths or sorted([p for p, _ in list_caches(cache_dir(out), include_partial=True)]
                                   + [p for p, _ in unreadable_caches(cache_dir(out))]))
    if not targets:
        raise VTError(f"no caches to verify under {cache_dir(out)}")
    failed = 0
    for path in targets:
        if not path.exists():
            raise VTError(f"no cache file at {path}")
        problems = verify_cache(path)
        failed += bool(problems)
        typer.echo(f"{'ok  ' if not problems else 'FAIL'} {path}" + ("" if not problems else ": " + "; ".join(problems)))
    if failed:
        raise typer.Exit(1)


@cache_app.command("rm")
def rm(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Caches of this model."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Caches of this dataset spec."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Caches of this split."),
    paths: Optional[List[Path]] = typer.Argument(None, help="Cache files to remove (instead of a selection)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: $VT_CACHE or the user cache dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
) -> None:
    """Remove caches: the files given, or every cache matching --model / --dataset / --split."""
    from vtbench.paths import cache_dir

    root = cache_dir(out)
    if paths:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise VTError(f"no cache file at {missing[0]}")
        targets = list(paths)
    elif model or dataset or split:
        targets = [p for p, _ in _selected(root, model, dataset, split)]
    else:
        raise VTError("say what to remove: cache files, or --model / --dataset / --split (see 'vt cache ls')")
    _remove(targets, dry_run, f"no caches match under {root}")


@cache_app.command("prune")
def prune(
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: $VT_CACHE or the user cache dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
) -> None:
    """Remove partial caches (interrupted runs, which a rerun would resume) and unreadable .h5 files."""
    from vtbench.cache import list_caches, unreadable_caches
    from vtbench.paths import cache_dir

    root = cache_dir(out)
    partial = [p for p, m in list_caches(root, include_partial=True) if m.get("status") != "complete"]
    _remove(sorted(partial + [p for p, _ in unreadable_caches(root)]), dry_run,
            f"nothing to prune under {root}")


def _remove(targets: list[Path], dry_run: bool, nothing: str) -> None:
    from vtbench.cache.store import CacheLock

    if not targets:
        typer.echo(nothing)
        return
    for path in targets:
        if dry_run:
            typer.echo(f"would remove {path}")
            continue
        final = path.with_name(path.name.replace(".partial.h5", ".h5")) if path.name.endswith(".partial.h5") else path
        lock = CacheLock(final).acquire(on_wait=lambda msg: typer.echo(msg, err=True))  # never under a writer
        try:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".skipped.jsonl").unlink(missing_ok=True)
        finally:
            lock.release()
        typer.echo(f"removed {path}")
