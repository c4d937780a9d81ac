"""`vt run`: a whole suite (extract -> probe/few-shot -> leaderboard) from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vtbench.cli.app import app


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Suite YAML (default: the embedded demo, configs/demo.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, marking what is already done, and stop."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars during extraction."),
) -> None:
    """Run a suite: models x datasets x token specs x protocols. Finished work is skipped, so reruns resume."""
    from vtbench.suite import load_suite, run_suite

    run_suite(load_suite(config), dry_run=dry_run, progress=progress, log=typer.echo)
