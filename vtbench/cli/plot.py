"""`vt plot per-block | bars`: PNG figures of the results store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import split_list

plot_app = typer.Typer(help="Figures of the results store (PNG).", no_args_is_help=True)
app.add_typer(plot_app, name="plot")

_RESULTS_HELP = "Results directory (default: $VT_RESULTS or ./results)."


@plot_app.command("per-block")
def per_block(
    results_dir: Optional[Path] = typer.Argument(None, help=_RESULTS_HELP),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset spec or short name (e.g. dtd)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output image (.png)."),
    models: Optional[List[str]] = typer.Option(None, "--models", "--model", "-m", help="Only these models."),
    protocol: str = typer.Option("default", "--protocol", "-p", help="Probe protocol of the per-block records."),
    metric: str = typer.Option("top1", "--metric", help="Metric on the y axis."),
) -> None:
    """Accuracy of each block's cls / patch / stage token, block by block."""
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.report.leaderboard import load_results
    from vtbench.report.plots import plot_per_block

    table = load_results(default_results_dir(results_dir))
    plot_per_block(table, dataset, out, models=split_list(models), protocol=protocol, metric=metric)
    typer.echo(f"wrote {out}")


@plot_app.command("bars")
def bars(
    results_dir: Optional[Path] = typer.Argument(None, help=_RESULTS_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output image (.png)."),
    models: Optional[List[str]] = typer.Option(None, "--models", "--model", "-m", help="Only these models."),
    tokens: Optional[List[str]] = typer.Option(None, "--tokens", "-t", help="Only these token specs."),
    protocol: Optional[List[str]] = typer.Option(None, "--protocol", "-p", help="Only these protocols."),
    datasets: Optional[List[str]] = typer.Option(None, "--datasets", "--dataset", "-d", help="Only these datasets."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric (default: top1 / few-shot accuracy)."),
) -> None:
    """Grouped bars: leaderboard rows side by side per dataset (few-shot with 95% CI error bars)."""
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.report.leaderboard import load_results
    from vtbench.report.plots import plot_bars

    table = load_results(default_results_dir(results_dir))
    plot_bars(
        table,
        out,
        models=split_list(models),
        tokens=split_list(tokens),
        protocols=split_list(protocol),
        datasets=split_list(datasets),
        metric=metric,
    )
    typer.echo(f"wrote {out}")
