"""`vt fewshot`: Meta-Dataset-style few-shot episodes on cached features (see docs/fewshot.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import MultiValueCommand, split_list


class _FewshotCommand(MultiValueCommand):
    multi_value = ("--shots", "--tokens", "-t", "--classifier", "--split", "-s", "--seeds")


@app.command(cls=_FewshotCommand)
def fewshot(
    model: str = typer.Option(..., "--model", "-m", help="timm model name, as given to `vt extract`."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset spec, as given to `vt extract`."),
    tokens: List[str] = typer.Option(["cls[-1]"], "--tokens", "-t", help="Token spec(s), e.g. 'cls[-4:]' 'cls[-1]+patch[-1]'."),
    sampler: Optional[str] = typer.Option(None, help="md (default): Meta-Dataset variable-way variable-shot; fixed: --ways-way --shots-shot."),
    classifier: List[str] = typer.Option(["lr"], "--classifier", help="lr (logistic regression) and/or ncc (nearest centroid, cosine)."),
    episodes: str = typer.Option("600", help="Number of episodes, or an episodes file (from --save-episodes) to replay."),
    ways: Optional[int] = typer.Option(None, help="Ways of the fixed sampler (default 5)."),
    shots: Optional[List[int]] = typer.Option(None, "--shots", help="Shots of the fixed sampler; several values run several protocols (default 1 5)."),
    queries: Optional[int] = typer.Option(None, help="Queries per class of the fixed sampler (default 15)."),
    classes: Optional[str] = typer.Option(None, help="Class split to draw from: test (default where defined), val, train or all."),
    split: Optional[List[str]] = typer.Option(None, "--split", "-s", help="Only pool these extracted splits (default: all that are cached)."),
    seed: Optional[int] = typer.Option(None, help="Episode seed (default 0)."),
    seeds: Optional[List[int]] = typer.Option(None, "--seeds", help="Several episode seeds, one result each: --seeds 0 1 2 (the leaderboard shows their mean ± std)."),
    l2_normalize: bool = typer.Option(True, "--l2-normalize/--no-l2-normalize", help="L2-normalise features first."),
    center: bool = typer.Option(False, "--center", help="ncc: subtract the mean of the episode's support features."),
    C: float = typer.Option(1.0, "--C", help="lr: inverse L2 strength as in scikit-learn (l2 = 1/(C*n_support))."),
    save_episodes: Optional[Path] = typer.Option(None, "--save-episodes", help="Write the episodes (image ids) to this JSON file."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature caches (default: $VT_CACHE, else the user cache dir)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Results store (default: $VT_RESULTS, else ./results)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip results already in the store."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    weights: Optional[str] = typer.Option(None, help="Pick caches whose weights sha256 starts with / source contains this."),
    transform: Optional[str] = typer.Option(None, help="Pick caches extracted with this transform (model or ipvit)."),
    norm: Optional[bool] = typer.Option(None, "--norm/--no-norm", help="Pick caches extracted with / without the final norm."),
    dtype: Optional[str] = typer.Option(None, help="Pick caches stored in this dtype."),
    root: Optional[Path] = typer.Option(None, "--root", help="Pick caches extracted from this dataset root (as given to `vt extract --root`)."),
) -> None:
    """Few-shot episodes on cached features: mean accuracy +- 95% CI over seeded, reproducible episodes."""
    from vtbench.fewshot import run_fewshot

    records = run_fewshot(
        model, dataset, split_list(tokens), sampler,
        classifier=split_list(classifier), episodes=episodes, ways=ways, shots=shots or None, queries=queries,
        classes=classes, seed=seed, seeds=seeds or None, split=split_list(split), l2_normalize=l2_normalize, center=center, C=C,
        save_episodes=save_episodes, cache_dir=cache_dir, results=results, skip_existing=skip_existing,
        device=device, weights=weights, transform=transform, norm=norm, dtype=dtype, data_root=root,
        log=lambda msg: typer.echo(msg, err=True),
    )
    for rec in records:
        m = rec["metrics"]
        head = f"{rec['model']} {rec['dataset']} {rec['tokens']} {rec['protocol']} {rec['variant']}"
        tail = "(already stored)" if rec.get("skipped") else f"({m['episodes']} episodes, {rec['timings']['solve_s']:.1f}s)"
        typer.echo(f"{head}: {m['accuracy']:.2f} +- {m['ci95']:.2f}% {tail}")
        for protocol, names in rec["fewshot"]["classes"].get("excluded_too_few_images", {}).items():
            if protocol == rec["protocol"] and not rec.get("skipped"):
                typer.echo(f"  note: {len(names)} class(es) have too few images for {protocol} and were left out")
    if save_episodes:
        typer.echo(f"episodes written to {save_episodes}")
