"""`vt extract` end to end on tiny random-init models and tiny image folders."""

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
import torch

from vtbench.errors import VTError
from vtbench.cache import open_cache
from vtbench.extract import extract
from vtbench.cache import list_caches, verify_cache
from tests.helpers import make_imagefolder

VIT = "vit_small_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
VT = str(Path(sys.executable).with_name("vt"))


@pytest.fixture
def folder(tmp_path) -> str:
    return f"imagefolder:{make_imagefolder(tmp_path / 'imgs')}"


def tiny(**kw):
    return dict(weights="random", model_kwargs=VIT_KW, progress=False, batch_size=4, workers=0, **kw)


def read_all(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[:]) if isinstance(obj, h5py.Dataset) else None)
        return out


def test_cache_matches_direct_forward(folder, tmp_path):
    (report,) = extract(VIT, folder, "train", **tiny(dtype="float32"))
    assert not report.reused and report.n == 15
    cache = open_cache(report.path)
    assert cache.kinds == {"cls": 3, "patch": 3, "prelogits": 1}
    assert cache.meta["status"] == "complete" and cache.meta["norm"] is True
    assert verify_cache(report.path) == []

    # Independent: the same images through the backbone, one at a time.
    from vtbench.data import get_dataset
    from vtbench.models import build_transform, create_backbone

    ds = get_dataset(folder, "train")
    bb = create_backbone(VIT, "random", model_kwargs=VIT_KW)
    fn, _ = build_transform(bb.data_config)
    x = torch.stack([fn(ds.load(i)) for i in range(len(ds))])
    want = bb.features(x, norm=True)
    for (kind, block), tensor in want.items():
        np.testing.assert_allclose(cache.block(kind, block), tensor.numpy(), rtol=1e-4, atol=1e-5)
    assert list(cache.labels) == list(ds.labels) and cache.image_ids == list(ds.image_ids)
    assert cache.features("cls[-2:]").shape == (15, 64)


def test_reuse_force_and_new_key(folder):
    (first,) = extract(VIT, folder, "train", **tiny())
    mtime = first.path.stat().st_mtime_ns
    content = read_all(first.path)
    (again,) = extract(VIT, folder, "train", **tiny())
    assert again.reused and again.path == first.path and first.path.stat().st_mtime_ns == mtime

    (no_norm,) = extract(VIT, folder, "train", **tiny(norm=False))
    assert not no_norm.reused and no_norm.path != first.path
    with open_cache(first.path) as a, open_cache(no_norm.path) as b:
        assert not np.allclose(a.block("cls", 0), b.block("cls", 0))

    (forced,) = extract(VIT, folder, "train", **tiny(force=True))
    assert not forced.reused and forced.path == first.path and forced.path.stat().st_mtime_ns != mtime
    recomputed = read_all(forced.path)
    assert all(np.array_equal(content[k], recomputed[k]) for k in content)  # deterministic


def test_a_second_run_waits_for_the_writer_of_the_same_cache_then_reuses_it(folder, tmp_path):
    """Two runs of the same cache: the second waits for the first's lock and never touches its files."""
    (made,) = extract(VIT, folder, "train", **tiny())
    content = read_all(made.path)
    aside = tmp_path / "made.h5"
    made.path.rename(aside)
    # Another process holds the lock (as a running `vt extract` does), then puts the finished cache in place.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from vtbench.cache.store import CacheLock\n"
        f"lock = CacheLock({str(made.path)!r}).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(1.5)\n"
        f"os.replace({str(aside)!r}, {str(made.path)!r})\n"
        "lock.release()\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        messages = []
        start = time.perf_counter()
        (second,) = extract(VIT, folder, "train", log=messages.append, **tiny())
        waited = time.perf_counter() - start
    finally:
        holder.wait(30)
    assert holder.returncode == 0
    assert messages == [f"waiting for another process (pid {holder.pid}) that is writing {made.path}"]
    assert second.reused and second.path == made.path and waited > 0.5
    assert all(np.array_equal(content[k], v) for k, v in read_all(second.path).items())
    assert not list(made.path.parent.glob(".*.lock"))  # released locks leave no file

    # A lock file left by a killed run is not held by anyone: it does not block.
    (made.path.parent / f".{made.path.name}.lock").write_text("999999")
    (forced,) = extract(VIT, folder, "train", log=messages.append, **tiny(force=True))
    assert not forced.reused and len(messages) == 1


def test_float16_default_chunks_under_1mib(folder):
    (report,) = extract(VIT, folder, "train", **tiny())
    with h5py.File(report.path, "r") as f:
        ds = f["features/patch/001"]
        assert ds.dtype == np.float16 and ds.compression is None
        assert ds.chunks[1] == 32 and ds.chunks[0] * 32 * 2 <= 1 << 20


def test_bad_images_skipped_and_listed(folder, tmp_path):
    root = Path(folder.split(":", 1)[1])
    bad = root / "train" / "class1" / "img002.png"
    bad.write_bytes(b"not a png at all")
    (report,) = extract(VIT, folder, "train", **tiny())
    assert len(report.skipped) == 1 and "img002" in report.skipped[0][0]
    cache = open_cache(report.path)
    assert len(cache) == 14 and len(cache.skipped) == 1
    assert "img002" in cache.skipped[0][0] and cache.skipped[0][1]
    assert verify_cache(report.path) == []
    with pytest.raises(VTError, match="img002"):
        extract(VIT, folder, "train", **tiny(on_error="fail", force=True))


def test_worker_processes_and_decode_threads_write_identical_caches(folder, tmp_path):
    """workers=N decodes in processes, workers=0 in a thread pool: same rows, same skips, same bytes."""
    root = Path(folder.split(":", 1)[1])
    (root / "train" / "class0" / "img001.png").write_bytes(b"truncated")
    threaded = tiny(cache_dir=tmp_path / "threads")
    processes = {**tiny(cache_dir=tmp_path / "procs"), "workers": 2}
    (a,) = extract(VIT, folder, "train", **threaded)
    (b,) = extract(VIT, folder, "train", **processes)
    assert a.key == b.key and len(a.skipped) == len(b.skipped) == 1
    content_a, content_b = read_all(a.path), read_all(b.path)
    assert content_a.keys() == content_b.keys()
    for name in content_a:
        np.testing.assert_array_equal(content_a[name], content_b[name], err_msg=name)


def test_interrupted_run_resumes_to_identical_content(folder, tmp_path, monkeypatch):
    (clean,) = extract(VIT, folder, "train", **tiny(cache_dir=tmp_path / "clean"))

    from vtbench.models import Backbone

    calls = {"n": 0}
    real = Backbone.features

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Backbone, "features", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(VIT, folder, "train", **tiny(cache_dir=tmp_path / "resumed"))
    monkeypatch.setattr(Backbone, "features", real)

    partials = list((tmp_path / "resumed").rglob("*.partial.h5"))
    assert len(partials) == 1 and not list_caches(tmp_path / "resumed")
    with pytest.raises(VTError, match="partial"):
        open_cache(partials[0])
    with h5py.File(partials[0], "r") as f:
        assert (f["row_status"][:] == 1).sum() == 8  # two batches of 4 were written

    (resumed,) = extract(VIT, folder, "train", **tiny(cache_dir=tmp_path / "resumed"))
    assert resumed.resumed_rows == 8 and not partials[0].exists()
    a, b = read_all(clean.path), read_all(resumed.path)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_several_models_share_one_decode_pass(folder, tmp_path):
    from vtbench.models import create_backbone

    vit = create_backbone(VIT, "random", model_kwargs=VIT_KW)
    other = create_backbone(VIT, "random", model_kwargs=VIT_KW, seed=1)
    reports = extract([vit, other], folder, "train", **tiny(cache_dir=tmp_path / "both"))
    assert len(reports) == 2 and reports[0].path != reports[1].path
    (alone,) = extract(VIT, folder, "train", **tiny(cache_dir=tmp_path / "alone", seed=1))
    assert read_all(alone.path)["features/cls/001"].tobytes() == read_all(reports[1].path)["features/cls/001"].tobytes()


def test_cnn_stages(folder):
    (report,) = extract("resnet18", folder, "test", weights="random", input_size=32, progress=False, workers=0)
    cache = open_cache(report.path)
    assert set(cache.kinds) == {"stage", "prelogits"}
    assert cache.features("stage[-1]").shape == (15, 512)
    assert cache.features("prelogits").shape == (15, 512)


def run_vt(*args, env=None, **kw):
    return subprocess.run([VT, *args], capture_output=True, text=True, env=env or os.environ.copy(), **kw)


def test_cli_extract_and_cache_commands(folder, tmp_path, vt):
    out = tmp_path / "c"
    args = ["extract", "--model", VIT, "--dataset", folder, "--split", "train,test", "--random-init",
            "--model-kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}',
            "--out", str(out), "--batch-size", "4", "--no-progress"]
    first = run_vt(*args)  # once as a real process, as a user runs it
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("images in") == 2
    second = vt(*args)
    assert second.returncode == 0 and second.stdout.count("cached") == 2

    ls = vt("cache", "ls", "--out", out)
    assert ls.returncode == 0 and ls.stdout.count("complete") == 2
    assert vt("cache", "ls", "--out", out, "-m", VIT, "-d", folder).stdout.count("complete") == 2
    assert vt("cache", "ls", "--out", out, "-d", "dtd").stdout == f"no caches for dataset dtd:1 under {out}\n"
    path = next(out.rglob("train-*.h5"))
    info = vt("cache", "info", path)
    assert "weights_sha256" in info.stdout and "/features/cls/002" in info.stdout
    verify = vt("cache", "verify", "--out", out)
    assert verify.returncode == 0 and verify.stdout.count("ok") == 2

    with h5py.File(path, "r+") as f:  # tamper with the identity
        f.attrs["norm"] = False
    verify = vt("cache", "verify", path)
    assert verify.returncode == 1 and "key" in verify.stdout


def test_nothing_to_extract_is_a_user_error_not_a_silent_success(tmp_path):
    make_imagefolder(tmp_path / "imgs", splits=("extra",))
    with pytest.raises(VTError, match=r"has none of the splits train, val, test \(found: extra\); name the ones"):
        extract(VIT, f"imagefolder:{tmp_path / 'imgs'}", **tiny(cache_dir=tmp_path / "out"))
    with pytest.raises(VTError, match="--split names none"):
        extract(VIT, f"imagefolder:{tmp_path / 'imgs'}", " , ", **tiny(cache_dir=tmp_path / "out"))
    (report,) = extract(VIT, f"imagefolder:{tmp_path / 'imgs'}", "extra", **tiny(cache_dir=tmp_path / "out"))
    assert report.n > 0


@pytest.mark.parametrize("args, needle", [
    (["--random-init", "--dataset", "no-such-dataset"], "no-such-dataset"),
    (["--random-init", "--dataset", "imagefolder:/does/not/exist"], "/does/not/exist"),
    (["--random-init", "--dataset", "digits", "--dtype", "int8"], "dtype"),
    (["--dataset", "digits", "--checkpoint", "/nope.safetensors"], "nope.safetensors"),
    (["--dataset", "digits", "--checkpoint", "/nope.safetensors", "--random-init"], "not both"),
    (["--random-init", "--dataset", "digits", "--input-size", "8"],
     "cannot be built for 8x8 inputs: its patches are 16x16 pixels"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path, vt):
    res = vt("extract", "--model", VIT, "--out", str(tmp_path), "--no-progress", *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_kill_9_then_rerun_gives_identical_content(tmp_path, vt, monkeypatch):
    """A real SIGKILL in the middle of a run, then a rerun, ends with the same file as a clean run."""
    folder = f"imagefolder:{make_imagefolder(tmp_path / 'imgs', classes=4, per_class=24, splits=('train',), size=(64, 48))}"
    kw = '{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}'
    base = ["extract", "--model", VIT, "--dataset", folder, "--split", "train", "--random-init", "--model-kwargs", kw,
            "--batch-size", "4", "--no-progress", "--workers", "0"]
    env = dict(os.environ, VT_COMMIT_EVERY_S="0")
    proc = subprocess.Popen([VT, *base, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").rglob("*.partial.h5"))
        if found:
            partial = found[0]
            with h5py.File(partial, "r", locking=False) as f:
                done = int((f["row_status"][:] == 1).sum())
            if done >= 40:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the dataset larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial is not None and partial.exists()

    res = run_vt(*base, "--out", str(tmp_path / "killed"), env=env)
    assert res.returncode == 0, res.stderr
    resumed = re.search(r"resumed: (\d+) rows from the earlier run, (\d+) computed in this one", res.stdout)
    assert resumed and int(resumed.group(1)) >= 40 and int(resumed.group(1)) + int(resumed.group(2)) == 4 * 24
    monkeypatch.setenv("VT_COMMIT_EVERY_S", "0")
    clean = vt(*base, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    (a,) = (tmp_path / "killed").rglob("*.h5")
    (b,) = (tmp_path / "clean").rglob("*.h5")
    assert a.name == b.name
    da, db = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for name in da:
        assert np.array_equal(da[name], db[name]), name
