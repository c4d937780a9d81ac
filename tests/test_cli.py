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
    assert code == 2 and err.startswith("error: --out ") and str(blocker) in err and err.count("\n") == 1, err


def test_version(vt):
    import vtbench

    res = vt("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"vtbench {vtbench.__version__}"


def test_unwritable_outputs_fail_before_any_work(tmp_path, vt):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = vt("extract", "-m", "resnet18", "-d", "digits", "--random-init", "--out", blocker / "cache")
    assert res.returncode == 2 and res.stderr.startswith(f"error: --out {blocker / 'cache'}: cannot be made")
    res = vt("probe", "-m", "resnet18", "-d", "digits", "-t", "prelogits", "--results", blocker)
    assert res.returncode == 2 and f"--results {blocker}: is a file, not a folder" in res.stderr
    res = vt("leaderboard", blocker)
    assert res.returncode == 2 and "is a file, not a results folder" in res.stderr


def test_cache_ls_and_verify_report_unreadable_files_and_prune_removes_them(tmp_path, vt):
    from vtbench.cache import write_cache
    import numpy as np

    root = tmp_path / "cache"
    meta = {"format_version": 1, "model": "m", "model_kwargs": {}, "weights_sha256": "ab" * 32, "transform": {},
            "norm": True, "dtype": "float32", "dataset": "digits", "split": "test", "data_fingerprint": "f",
            "token_kinds": ["cls"], "precision": "fp32", "timm_version": "x", "torch_version": "y"}
    good = write_cache(root, meta, {("cls", 0): np.ones((4, 3), np.float32)}, [0, 1, 0, 1], list("abcd"), ["0", "1"])
    (root / "empty.h5").write_bytes(b"")
    (root / "truncated.h5").write_bytes(good.read_bytes()[:500])
    ls = vt("cache", "ls", "--out", root)
    assert ls.returncode == 1 and ls.stdout.count("FAIL") == 2 and "rows 4/4" in ls.stdout and "clsx1" in ls.stdout
    verify = vt("cache", "verify", "--out", root)
    assert verify.returncode == 1 and verify.stdout.count("FAIL") == 2 and verify.stdout.count("ok ") == 1
    assert vt("cache", "prune", "--out", root, "--dry-run").stdout.count("would remove") == 2
    prune = vt("cache", "prune", "--out", root)
    assert prune.returncode == 0 and sorted(p.name for p in root.rglob("*.h5")) == [good.name]
    assert vt("cache", "verify", "--out", root).returncode == 0
    rm = vt("cache", "rm", "--out", root, "-m", "m", "-d", "digits")
    assert rm.returncode == 0 and not good.exists()
    assert vt("cache", "rm", "--out", root).returncode == 2
