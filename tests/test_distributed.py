"""Sharded extraction under torchrun (gloo, 2 CPU ranks): the merged cache is the one-process cache, and a
kill -9 of a rank, then a rerun with another number of ranks, resumes to the same file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import make_imagefolder
from vtbench.cache import verify_cache

VT = str(Path(sys.executable).with_name("vt"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
KW = '{"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 2}'


def _args(folder, out):
    return ["extract", "--model", "vit_small_patch16_224", "--dataset", folder, "--split", "train", "--random-init",
            "--model-kwargs", KW, "--batch-size", "4", "--no-progress", "--perturb", "patchdrop:random:0.5",
            "--out", str(out)]


def _env():
    return dict(os.environ, VT_COMMIT_EVERY_S="0", VT_DIST_TIMEOUT_S="60", OMP_NUM_THREADS="1")


def _torchrun(n, args, **kw):
    return [TORCHRUN, f"--nproc_per_node={n}", "--master_port", str(29500 + os.getpid() % 500), "-m", "vtbench", *args]


def _contents(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*.h5")):
        with h5py.File(path, "r") as f:
            data = {}
            f.visititems(lambda n, o: data.__setitem__(n, o[:]) if isinstance(o, h5py.Dataset) else None)
            attrs = {k: str(v) for k, v in f.attrs.items() if k not in ("created", "completed")}
        out[path.name] = (data, attrs)
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        (da, aa), (db, ab) = a[name], b[name]
        assert aa == ab, name
        assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da), name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return f"imagefolder:{make_imagefolder(root / 'imgs', classes=4, per_class=80, splits=('train',), size=(64, 48))}"


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    res = subprocess.run([VT, *_args(folder, out)], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return _contents(out)


def test_two_ranks_merge_to_the_one_process_cache(folder, single, tmp_path):
    res = subprocess.run(_torchrun(2, _args(folder, tmp_path / "two")), env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rank 0/2" in res.stderr and "rank 1/2" in res.stderr
    assert not list((tmp_path / "two").rglob("*.shard-*")) and not list((tmp_path / "two").rglob("*.partial.h5"))
    for path in (tmp_path / "two").rglob("*.h5"):
        assert verify_cache(path) == []
    _same(_contents(tmp_path / "two"), single)


def test_kill_9_of_a_rank_then_a_rerun_with_other_ranks_resumes_to_the_same_cache(folder, single, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(2, _args(folder, out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, done = time.time() + 90, 0
    while time.time() < deadline and proc.poll() is None and done < 24:
        for shard in out.rglob("*.shard-*.h5"):
            try:
                with h5py.File(shard, "r", locking=False) as f:
                    done = max(done, int((f["row_status"][:] != 0).sum()))
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    assert proc.poll() is None and done >= 24, "the run finished (or never started) before it could be killed"
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "vtbench"], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.wait(timeout=90)
    assert proc.returncode != 0 and list(out.rglob("*.shard-*.h5"))
    # a rerun on one process resumes from the shards' rows (then merges); three ranks would too
    res = subprocess.run([VT, *_args(folder, out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import re

    rows = re.search(r"rank 0/1: (\d+) rows of 2 cache", res.stderr)
    assert rows and int(rows.group(1)) <= 2 * 320 - 24, res.stderr[-2000:]  # what the killed job wrote is kept
    assert not list(out.rglob("*.shard-*"))
    _same(_contents(out), single)
