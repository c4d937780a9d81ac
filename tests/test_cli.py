"""`vt`'s entry point: bad usage is one line on stderr and exit code 2; help and success are unchanged."""

from __future__ import annotations

import pytest

from vtbench.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("argv, message", [
    (["probe", "--bogus"], "error: No such option: --bogus (see 'vt probe --help')"),
    (["probe", "-m", "x", "-d", "y", "--tokens", "a", "--seed", "abc"], "error: Invalid value for '--seed'"),
    (["plot", "per-block", "results"], "error: Missing option '--dataset'. (see 'vt plot per-block --help')"),
    (["no-such-command"], "error: No such command 'no-such-command'."),
])
def test_bad_usage_is_one_line_and_exit_code_2(argv, message, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_help_and_no_arguments_still_print_the_help(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and "extract" in out and "fewshot" in out
    code, out, err = _run([], capsys)
    assert code == 2 and "Usage" in out + err and "error:" not in err


def test_a_command_that_succeeds_exits_0(capsys):
    code, out, _ = _run(["datasets"], capsys)
    assert code == 0 and "gtsrb" in out
