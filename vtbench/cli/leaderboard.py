"""`vt leaderboard`: tables of the results store (markdown, csv or json)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import split_list
from vtbench.errors import VTError

FORMATS = ("markdown", "csv", "json")


@app.command("leaderboard")
def leaderboard(
    results_dir: Optional[Path] = typer.Argument(None, help="Results directory (default: $VT_RESULTS or ./results)."),
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown, csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
    protocol: Optional[List[str]] = typer.Option(
        None, "--protocol", "-p", help="Only these protocols (repeat or comma-separate)."
    ),
    tokens: Optional[List[str]] = typer.Option(
        None, "--tokens", "-t", help="Only these token specs (default: all but per-block ones like cls[3])."
    ),
    models: Optional[List[str]] = typer.Option(None, "--models", "--model", "-m", help="Only these models."),
    datasets: Optional[List[str]] = typer.Option(None, "--datasets", "--dataset", "-d", help="Only these datasets."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Metric to show (default: top1 for probes, accuracy for few-shot)."
    ),
) -> None:
    """Rows = model + tokens + protocol, columns = datasets, then the mean and the average rank."""
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.report.leaderboard import leaderboard_from_dir

    if fmt not in FORMATS:
        raise VTError(f"unknown --format '{fmt}'; use one of: {', '.join(FORMATS)}")
    if out is not None:
        from vtbench.paths import writable_dir

        if out.is_dir():
            raise VTError(f"--out {out}: is a folder; give a file name")
        writable_dir(out.parent, "--out")
    board = leaderboard_from_dir(
        default_results_dir(results_dir),
        protocols=split_list(protocol),
        tokens=split_list(tokens),
        models=split_list(models),
        datasets=split_list(datasets),
        metric=metric,
    )
    text = {"markdown": board.to_markdown, "csv": board.to_csv, "json": board.to_json}[fmt]()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)
