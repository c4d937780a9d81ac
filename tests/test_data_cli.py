"""`vt datasets`: listing, details, layout checks, and user errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vtbench.cli import main
from vtbench.data import list_datasets

REPO = Path(__file__).resolve().parents[1]


def run_vt(capsys, *args) -> tuple[int, str, str]:
    """Run `vt` in-process through its real entry point; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def test_list_shows_every_dataset_with_layout(capsys):
    code, out, err = run_vt(capsys, "datasets")
    assert code == 0 and err == ""
    for info in list_datasets():
        assert f"{info.name} " in out and info.summary in out and f"layout: {info.layout}" in out


def test_details_without_root_only_describe(capsys):
    code, out, _ = run_vt(capsys, "datasets", "dtd")
    assert code == 0
    assert out.startswith("dtd:1\n")
    assert "the IPViT paper trained on train+val" in out and "pass --root DIR" in out
    code, out, _ = run_vt(capsys, "datasets", "gtsrb")  # no official val split: probes hold out part of train
    assert "train on train, validate on a seeded stratified 20% of train, test on test" in out


def test_check_counts_images_per_split(tmp_path, capsys):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            d = tmp_path / split / ("a" if i % 2 else "b")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.png").write_bytes(b"")  # counted, never decoded
    code, out, _ = run_vt(capsys, "datasets", f"imagefolder:{tmp_path}")
    assert code == 0
    assert "  train:    3 images, 2 classes present" in out and "  test:     2 images, 2 classes present" in out
    assert "validate on a seeded stratified 20% of train," in out  # no val folder on disk
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "0.png").write_bytes(b"")
    code, out, _ = run_vt(capsys, "datasets", f"imagefolder:{tmp_path}")
    assert "train on train, validate on val, test on test" in out
    code, out, _ = run_vt(capsys, "datasets", f"imagefolder:{tmp_path}", "--split", "test")
    assert "train:" not in out and "  classes:  2" in out


@pytest.mark.shared
def test_check_shared_dtd(shared_data, capsys):
    code, out, _ = run_vt(capsys, "datasets", "dtd", "--root", str(shared_data / "dtd"))
    assert code == 0
    for line in ("train:    130 images", "val:      130 images", "test:     140 images", "classes:  10"):
        assert line in out


@pytest.mark.parametrize("args, start", [
    (["datasets", "imagenet"], "error: unknown dataset 'imagenet'; registered: aircraft"),
    (["datasets", "gtsrb", "--root", "{tmp}", "--split", "val"], "error: gtsrb has no split 'val'"),
    (["datasets", "cub", "--root", "{tmp}/absent"], "error: cub: no folder {tmp}/absent; expected <root>/CUB_200_2011/"),
    (["datasets", "dtd", "--root", "{tmp}"], "error: dtd: no labels/train1.txt under {tmp}; expected <root>/images/"),
])
def test_user_errors_are_one_line(args, start, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    tmp = str(tmp_path.resolve())
    code, _, err = run_vt(capsys, *[a.format(tmp=tmp) for a in args])
    assert code == 2
    assert err.startswith(start.format(tmp=tmp)) and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_reports_missing_root(tmp_path):
    """The installed `vt` entry point: exit 2, one `error:` line on stderr, no traceback."""
    vt = Path(sys.executable).with_name("vt")
    proc = subprocess.run([str(vt), "datasets", "gtsrb", "--root", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: gtsrb: no GTSRB under {tmp_path}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
