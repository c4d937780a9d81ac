"""The typer application that every `vt` command registers on."""

import typer

app = typer.Typer(
    name="vt",
    help="vtbench: per-block feature extraction and transfer benchmarks for frozen vision backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        import vtbench

        typer.echo(f"vtbench {vtbench.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print vtbench's version and exit.")) -> None:
    """vtbench: per-block feature extraction and transfer benchmarks for frozen vision backbones."""
