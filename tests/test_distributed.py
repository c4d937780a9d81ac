"""Sharded extraction under torchrun (gloo, 2 CPU ranks): the merged cache is the one-process cache; a
kill -9 of a rank stops the job (the survivor with one line), and a rerun with the same or another number
of ranks resumes to the same file."""

from __future__ import annotations

import os
import re
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


def _wait_for_shard_rows(out: Path, procs, rows: int = 24) -> None:
    """Until some shard under ``out`` has committed ``rows`` rows, while every process still runs."""
    deadline, done = time.time() + 90, 0
    while time.time() < deadline and all(p.poll() is None for p in procs) and done < rows:
        for shard in out.rglob("*.shard-*.h5"):
            try:
                with h5py.File(shard, "r", locking=False) as f:
                    done = max(done, int((f["row_status"][:] != 0).sum()))
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs) and done >= rows, "the run ended (or never started) too early"


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
    _wait_for_shard_rows(out, [proc])
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "vtbench"], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.wait(timeout=90)
    assert proc.returncode != 0 and list(out.rglob("*.shard-*.h5"))
    # a rerun on one process resumes from the shards' rows (then merges); three ranks would too
    res = subprocess.run([VT, *_args(folder, out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = re.search(r"rank 0/1: (\d+) rows of 2 cache", res.stderr)
    assert rows and int(rows.group(1)) <= 2 * 320 - 24, res.stderr[-2000:]  # what the killed job wrote is kept
    assert not list(out.rglob("*.shard-*"))
    _same(_contents(out), single)


def test_a_dead_rank_stops_the_other_with_one_line_and_a_rerun_on_as_many_ranks_resumes(folder, single, tmp_path):
    out = tmp_path / "srun"
    port = str(29000 + os.getpid() % 500)
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    # launched by hand, as srun would: no torchrun agent stops the survivor, only vtbench's barriers
    ranks = [subprocess.Popen([sys.executable, "-m", "vtbench", *_args(folder, out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    _wait_for_shard_rows(out, ranks)
    ranks[0].kill()  # the leader dies
    _, err = ranks[1].communicate(timeout=90)
    ranks[0].wait(timeout=10)
    assert ranks[1].returncode == 2 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: stopped while waiting for the other ranks"), err
    res = subprocess.run(_torchrun(2, _args(folder, out)), env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = [int(n) for n in re.findall(r"resumed: (\d+) rows from the earlier run", res.stdout + res.stderr)]
    assert len(resumed) == 2 and all(24 <= n < 320 for n in resumed), res.stdout + res.stderr[-2000:]
    assert not list(out.rglob("*.shard-*"))
    _same(_contents(out), single)
