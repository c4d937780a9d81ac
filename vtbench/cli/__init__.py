"""`vt`: the command-line interface. Each command lives in its own module and calls the Python API.

Heavy libraries (torch, timm, h5py) are imported inside commands so that
`vt --help` stays fast.
"""

from __future__ import annotations

import sys

from vtbench.cli.app import app
from vtbench.errors import VTError

# Importing a command module registers its commands on `app`.
from vtbench.cli import (  # noqa: E402,F401
    cache,
    datasets,
    extract,
    fewshot,
    leaderboard,
    models,
    plot,
    probe,
    run,
)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="vt")
    except VTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
