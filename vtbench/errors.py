"""User-facing errors.

Anything a user can get wrong (a missing dataset root, an unknown token spec, a
cache that does not exist yet) raises :class:`VTError`. The CLI prints its
message as one line and exits with code 2; the Python API lets it propagate.
"""


class VTError(Exception):
    """An error caused by user input or environment, reported as one line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))
