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
