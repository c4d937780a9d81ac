"""`vt datasets`: list the registered datasets, show one, and check its files on disk."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import split_list


@app.command()
def datasets(
    spec: Optional[str] = typer.Argument(None, metavar="[DATASET]", help="A dataset spec: dtd, dtd:2, places365:large, imagefolder:PATH, csv:FILE, hf:NAME, digits."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root to check (default: $VT_DATA/<name>)."),
    split: Optional[List[str]] = typer.Option(None, "--split", "-s", help="Split(s) to check, repeatable or comma-separated (default: all)."),
) -> None:
    """List every registered dataset, or show one; with a root, check its layout and count images per split."""
    from vtbench.data import available_splits, canonical_spec, dataset_info, get_dataset, list_datasets, resolve_root
    from vtbench.errors import VTError
    from vtbench.transfer.features import VAL_FRACTION

    if spec is None:
        if root or split:
            raise VTError("--root and --split need a dataset: vt datasets NAME --root DIR")
        for info in list_datasets():
            typer.echo(f"{info.name:<12} {', '.join(info.splits):<26} {info.summary}")
            typer.echo(f"{'':<12} layout: {info.layout}")
        return

    info = dataset_info(spec)
    typer.echo(canonical_spec(spec))
    typer.echo(f"  {info.summary}")
    typer.echo(f"  layout:   {info.layout}")
    if info.generic:
        typer.echo(f"  splits:   those found on disk (usually {', '.join(info.splits)})")
    else:
        typer.echo(f"  splits:   {', '.join(info.splits)}")
    val_split = info.val_split
    if info.generic and val_split:  # generic sources have a val split only where one is on disk
        try:
            val_split = val_split if val_split in available_splits(spec, root) else None
        except VTError:
            pass  # not on disk (yet): reported below
    val = f"validate on {val_split}" if val_split else f"validate on a seeded stratified {VAL_FRACTION:.0%} of train"
    typer.echo(f"  probes:   train on {info.train_split}, {val}, test on {info.test_split}; "
               f"the IPViT paper trained on {'+'.join(info.paper_train_splits)}")
    location = resolve_root(spec, root)
    if info.needs_root and location is None:
        typer.echo("  (pass --root DIR or set $VT_DATA to check the files)")
        return
    if location is not None:
        typer.echo(f"  root:     {location.resolve()}")
    classes = None
    for name in split_list(split) or available_splits(spec, root):
        imageset = get_dataset(spec, name, root)
        classes = len(imageset.class_names)
        present = len(set(imageset.labels.tolist()))
        typer.echo(f"  {name + ':':<10}{len(imageset)} images, {present} classes present")
    typer.echo(f"  classes:  {classes}")
