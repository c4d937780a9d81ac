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
    robust,
    run,
)


def _click_exceptions():
    """The click exceptions typer raises: its own vendored copy in newer releases, click's in older ones."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors, bad usage included, become one line on stderr and exit code 2."""
    import typer

    errors = _click_exceptions()
    no_args = getattr(errors, "NoArgsIsHelpError", ())  # click >= 8.2
    try:
        # Not standalone: click's usage errors reach us instead of being drawn as a multi-line panel.
        code = app(args=argv, prog_name="vt", standalone_mode=False)
    except VTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except no_args as exc:  # `vt` or `vt cache` alone: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except errors.ClickException as exc:  # a missing or unknown option, a bad value
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a path that cannot be created, read or written (permissions, a full disk)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # end of input at a prompt
        print("aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
