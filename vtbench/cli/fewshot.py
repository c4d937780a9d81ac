"""`vt fewshot`: Meta-Dataset-style few-shot episodes on cached features (see docs/fewshot.md)."""

from __future__ import annotations

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from, split_list
from vtbench.fewshot.run import FEWSHOT_OPTIONS


def fewshot(**values) -> None:
    """Few-shot episodes on cached features: mean accuracy +- 95% CI over seeded, reproducible episodes."""
    from vtbench.fewshot import run_fewshot
    from vtbench.options import api_kwargs

    for name in ("tokens", "classifier", "split"):
        values[name] = split_list(values[name])
    values["shots"] = values["shots"] or None
    values["seeds"] = values["seeds"] or None
    records = run_fewshot(**api_kwargs(FEWSHOT_OPTIONS, values), log=lambda msg: typer.echo(msg, err=True))
    for rec in records:
        m = rec["metrics"]
        head = f"{rec['model']} {rec['dataset']} {rec['tokens']} {rec['protocol']} {rec['variant']}"
        tail = "(already stored)" if rec.get("skipped") else f"({m['episodes']} episodes, {rec['timings']['solve_s']:.1f}s)"
        typer.echo(f"{head}: {m['accuracy']:.2f} +- {m['ci95']:.2f}% {tail}")
        for protocol, names in rec["fewshot"]["classes"].get("excluded_too_few_images", {}).items():
            if protocol == rec["protocol"] and not rec.get("skipped"):
                typer.echo(f"  note: {len(names)} class(es) have too few images for {protocol} and were left out")
    if values["save_episodes"]:
        typer.echo(f"episodes written to {values['save_episodes']}")


command_from(app, "fewshot", FEWSHOT_OPTIONS, fewshot)
