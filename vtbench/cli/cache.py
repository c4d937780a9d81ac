"""`vt cache ls | info | verify`: inspect the feature caches."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.errors import VTError

cache_app = typer.Typer(help="List, inspect and verify feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


@cache_app.command("ls")
def ls(
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: $VT_CACHE or the user cache dir)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only this dataset spec (e.g. dtd, gtsrb)."),
    partial: bool = typer.Option(True, "--partial/--no-partial", help="Also list interrupted (partial) runs."),
) -> None:
    """List caches: model, dataset/split, rows, status, size, weights and key."""
    from vtbench.data import canonical_spec
    from vtbench.extract.cache import list_caches
    from vtbench.paths import cache_dir

    root = cache_dir(out)
    dataset = canonical_spec(dataset) if dataset else None  # as caches name it: dtd -> dtd:1
    rows = [(p, m) for p, m in list_caches(root, include_partial=partial)
            if (model is None or m.get("model") == model) and (dataset is None or m.get("dataset") == dataset)]
    if not rows:
        which = " and ".join(f"{k} {v}" for k, v in (("model", model), ("dataset", dataset)) if v)
        typer.echo(f"no caches{' for ' + which if which else ''} under {root}")
        return
    typer.echo(f"{len(rows)} cache(s) under {root}")
    for path, m in rows:
        mode = m.get("transform", {}).get("mode", "?")
        typer.echo(
            f"{m.get('status', '?'):8s} {m.get('model')}  {m.get('dataset')}/{m.get('split')}  n={m.get('n')}  "
            f"{_size(path)}  weights={str(m.get('weights_sha256', ''))[:12]}  transform={mode}  "
            f"norm={m.get('norm')}  {m.get('dtype')}  {path.relative_to(root)}"
        )


@cache_app.command("info")
def info(path: Path = typer.Argument(..., help="A cache file.")) -> None:
    """Show a cache's metadata and its datasets."""
    import h5py

    from vtbench.extract.cache import read_meta

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
    from vtbench.extract.cache import list_caches, verify_cache
    from vtbench.paths import cache_dir

    targets = list(paths or [p for p, _ in list_caches(cache_dir(out), include_partial=True)])
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
