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
    (["plot", "per-block", "results"], "error: Missing option '--dataset' / '-d'. (see 'vt plot per-block --help')"),
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


def test_a_device_that_is_not_here_is_a_user_error_in_every_command(monkeypatch, capsys):
    import torch

    from vtbench.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    # Each command resolves the device before it reads anything, so no cache or dataset is needed here.
    for argv in (["extract", "-m", "test_vit", "-d", "digits", "--random-init", "--device", "cuda"],
                 ["probe", "-m", "test_vit", "-d", "digits", "--tokens", "cls[-1]", "--device", "cuda:0"],
                 ["fewshot", "-m", "test_vit", "-d", "digits", "--tokens", "cls[-1]", "--device", "cuda"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and err.startswith("error: --device cuda") and "CUDA is not available" in err, err
    code, _, err = _run(["fewshot", "-m", "test_vit", "-d", "digits", "--device", "mps"], capsys)
    assert code == 2 and err == "error: unknown device 'mps'; use auto, cpu or cuda\n"


def test_a_path_that_cannot_be_created_is_one_line_and_exit_code_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = _run(["extract", "-m", "test_vit", "-d", "digits", "--random-init", "--split", "test",
                         "--no-progress", "--out", str(blocker / "cache")], capsys)
    assert code == 2 and err.startswith("error: [Errno") and str(blocker) in err and err.count("\n") == 1, err
