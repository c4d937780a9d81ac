"""`vt leaderboard`: tables of the results store (markdown, csv or json)."""

from __future__ import annotations

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from, split_list
from vtbench.errors import VTError
from vtbench.report.leaderboard import FORMATS, LEADERBOARD_OPTIONS


def leaderboard(**values) -> None:
    """Rows = model + tokens + protocol, columns = datasets, then the mean and the average rank."""
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.paths import writable_dir
    from vtbench.report.leaderboard import leaderboard_from_dir
    from vtbench.settings import SettingsQuery

    fmt, out = values["fmt"], values["out"]
    if fmt not in FORMATS:
        raise VTError(f"unknown --format '{fmt}'; use one of: {', '.join(FORMATS)}")
    if out is not None:
        if out.is_dir():
            raise VTError(f"--out {out}: is a folder; give a file name")
        writable_dir(out.parent, "--out")
    board = leaderboard_from_dir(
        default_results_dir(values["results_dir"]),
        **{name: split_list(values[name]) for name in ("tokens", "models", "datasets")},
        protocols=split_list(values["protocol"]), metric=values["metric"], settings=SettingsQuery.from_options(values),
    )
    text = {"markdown": board.to_markdown, "csv": board.to_csv, "json": board.to_json}[fmt]()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


# No multi-value rewriting: a bare word after --protocol could be the results folder.
command_from(app, "leaderboard", LEADERBOARD_OPTIONS, leaderboard, multi_value=False)
