"""Numbers a user can trust, on the real shared data: caches of other data are never picked silently,
a probe's number does not depend on what is probed beside it, and `default` solves what `sklearn` solves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vtbench import results as store
from vtbench.errors import VTError
from vtbench.extract import extract
from vtbench.report.leaderboard import leaderboard_from_dir
from vtbench.transfer import run_probe

from conftest import SHARED_DATA

MODEL = "tf_efficientnet_lite0"
pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture
def broken_copy(tmp_path, lite0_cache_dir, lite0_weights):
    """The session's DTD caches plus those of a copy of shared DTD whose first 3 train images are broken."""
    cache = tmp_path / "cache"
    shutil.copytree(lite0_cache_dir, cache)
    copy = tmp_path / "dtd-copy"
    shutil.copytree(SHARED_DATA / "dtd", copy)
    train = [ln.strip() for ln in (copy / "labels" / "train1.txt").read_text().splitlines() if ln.strip()]
    for name in train[:3]:
        path = copy / "images" / name
        path.write_bytes(path.read_bytes()[:200])  # truncated JPEGs: skipped, and another fingerprint
    extract(MODEL, "dtd", ["train", "val", "test"], root=copy, weights=str(lite0_weights), cache_dir=cache, progress=False)
    return cache, copy, train[:3]


def test_caches_of_other_data_are_an_error_until_root_narrows_them(broken_copy, tmp_path):
    cache, copy, broken = broken_copy
    with pytest.raises(VTError) as err:
        run_probe(MODEL, "dtd", "prelogits", cache_dir=cache, results_dir=tmp_path / "r")
    message = str(err.value)
    assert "2 different caches match" in message and "--root" in message
    assert f"root {copy}" in message and f"root {SHARED_DATA / 'dtd'}" in message and "3 skipped" in message

    kw = dict(cache_dir=cache, results_dir=tmp_path / "r", skip_existing=True)
    (real,) = run_probe(MODEL, "dtd", "prelogits", data_root=SHARED_DATA / "dtd", **kw)
    (damaged,) = run_probe(MODEL, "dtd", "prelogits", data_root=copy, **kw)  # not passed off as the stored one
    assert real["n"]["train"] == 130 and damaged["n"]["train"] == 127
    assert real["metrics"]["top1"] == pytest.approx(85.714, abs=0.01)
    assert real["_path"] != damaged["_path"] and len(store.load(tmp_path / "r")) == 2
    assert store.identity(real)["data"] != store.identity(damaged)["data"]
    assert set(damaged["caches"]["train"][0]["skipped"]) == {f"images/{b}" for b in broken}
    (again,) = run_probe(MODEL, "dtd", "prelogits", data_root=copy, **kw)  # now it is stored
    assert again["skipped"] and again["_path"] == damaged["_path"]

    notes = "\n".join(leaderboard_from_dir(tmp_path / "r").notes)
    assert "Skipped images" in notes and "3 of 130 train images" in notes


def test_a_cache_lacking_the_spec_kinds_is_passed_over(tmp_path, lite0_cache_dir, lite0_weights):
    cache = tmp_path / "cache"
    shutil.copytree(lite0_cache_dir, cache)
    # A newer cache of the same data and settings with pre-logits only, beside the complete one.
    extract(MODEL, "dtd", ["train"], root=SHARED_DATA / "dtd", weights=str(lite0_weights), cache_dir=cache,
            kinds=["prelogits"], progress=False)
    (rec,) = run_probe(MODEL, "dtd", "stage[-1]", cache_dir=cache, results_dir=tmp_path / "r")
    assert rec["metrics"]["top1"] > 80


def test_a_spec_gets_the_same_record_alone_and_in_a_batch(lite0_cache_dir, tmp_path):
    kw = dict(cache_dir=lite0_cache_dir, device="cpu")
    batch = run_probe(MODEL, "dtd", ["stage[-1]", "prelogits", "stage[-2:]"], per_block=True,
                      results_dir=tmp_path / "batch", **kw)
    by_spec = {r["tokens"]: r for r in batch}
    for spec in ("prelogits", "stage[-2:]", "stage[2]"):
        (alone,) = run_probe(MODEL, "dtd", spec, results_dir=tmp_path / "alone", **kw)
        together = by_spec[spec]
        assert alone["selection"] == together["selection"]
        assert alone["metrics"] == together["metrics"]
        assert json.loads(Path(alone["_path"]).read_text())["metrics"] == together["metrics"]


def test_default_and_sklearn_solve_the_same_problem(lite0_cache_dir, tmp_path):
    specs = ["prelogits", "stage[-1]", "stage[-2:]"]
    recs = run_probe(MODEL, "dtd", specs, ["default", "sklearn"], cache_dir=lite0_cache_dir,
                     results_dir=tmp_path, device="cpu")
    by = {(r["tokens"], r["protocol"]): r for r in recs}
    for spec in specs:
        ours, ref = by[(spec, "default")], by[(spec, "sklearn")]
        assert ours["selection"]["chosen"] == ref["selection"]["chosen"], spec
        assert abs(ours["metrics"]["top1"] - ref["metrics"]["top1"]) <= 0.5, spec
        assert all(ours["solver"]["selection"]["converged"]) and ours["solver"]["refit"]["converged"]
        both = [g for g, (a, b) in enumerate(zip(ours["solver"]["selection"]["converged"],
                                                 ref["solver"]["selection"]["converged"])) if a and b]
        assert len(both) >= 8, spec
        for g in both:
            assert abs(ours["selection"]["val_top1"][g] - ref["selection"]["val_top1"][g]) <= 0.5, (spec, g)


def test_a_suite_reads_the_caches_of_its_roots(broken_copy, tmp_path, lite0_weights):
    from vtbench.suite import load_suite, plan, run_suite

    cache, copy, _ = broken_copy
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
suite: roots
datasets: [dtd]
roots: {{dtd: {SHARED_DATA / 'dtd'}}}
cache_dir: {cache}
results: {tmp_path / 'results'}
models:
  - model: {MODEL}
    checkpoint: {lite0_weights}
    tokens: [prelogits]
probe: {{protocol: [default]}}
leaderboard: {{plots: []}}
""")
    suite = load_suite(path)
    (extract_step,) = [s for s in plan(suite) if s.kind == "extract"]
    assert extract_step.done and "3/3 cached" in extract_step.line()
    run_suite(suite, progress=False, log=lambda msg: None)
    (rec,) = store.load(tmp_path / "results").records
    assert rec["n"]["train"] == 130 and {r["dataset_root"] for r in rec["caches"]["train"]} == {str(SHARED_DATA / "dtd")}
