"""`vt run`: a whole suite (extract -> probe/few-shot -> leaderboard) from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import split_list


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Suite YAML (default: the embedded demo, configs/demo.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, marking what is already done, and stop."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars during extraction."),
    datasets: Optional[List[str]] = typer.Option(
        None, "--datasets", "--dataset", "-d", help="Run only these of the suite's datasets (repeat or comma-separate)."
    ),
    keys: bool = typer.Option(False, "--keys", help="Print every key a suite file takes (docs/suite.md) and stop."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Run shard I/N of the suite's (dataset, model) units "
                                        "(job arrays; 1-based); shards share the results store, report afterwards "
                                        "with `vt run SUITE`."),
) -> None:
    """Run a suite: models x datasets x token specs x protocols. Finished work is skipped, so reruns resume."""
    from vtbench.errors import VTError
    from vtbench.suite import key_reference, load_suite, run_shard, run_suite

    if keys:
        typer.echo(key_reference(), nl=False)
        return
    suite = load_suite(config)
    if datasets:
        suite = suite.only(split_list(datasets))
    if shard is None:
        run_suite(suite, dry_run=dry_run, progress=progress, log=typer.echo)
        return
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        raise VTError(f"--shard takes I/N, e.g. 1/4, not '{shard}'") from None
    run_shard(suite, index, count, dry_run=dry_run, progress=progress, log=typer.echo)
