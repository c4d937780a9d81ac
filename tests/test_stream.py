"""Probes beyond memory: features streamed from the cache in row chunks give the in-memory answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_probe import MODEL, write_toy
from vtbench.cache import CacheSet
from vtbench.errors import VTError
from vtbench.tokens import parse_spec
from vtbench.transfer import memory, run_probe
from vtbench.transfer.features import stratified_holdout
from vtbench.transfer.solver import RowSource, fit_logreg

PER_CLASS = {"train": 60, "val": 20, "test": 20}
SPECS = ["cls[-1]", "cls[-4:]+patch[-1]"]
# 300-400 train(+val) rows x 8 or 40 dims: beyond 64 KB, so chunks of memory.MIN_CHUNK_ROWS (64) rows.
SMALL = "64K"


@pytest.fixture
def big_toy(tmp_path):
    return write_toy(tmp_path / "cache", per_class=PER_CLASS)


@pytest.fixture
def held_out_toy(tmp_path):
    return write_toy(tmp_path / "cache", dataset="gtsrb", splits=("train", "test"), per_class=PER_CLASS)


def _both(cache, tmp_path, protocol, dataset="dtd"):
    kwargs = dict(cache_dir=cache, device="cpu", protocol=protocol)
    lines = []
    in_memory = run_probe(MODEL, dataset, SPECS, results_dir=tmp_path / "mem", **kwargs)
    streamed = run_probe(MODEL, dataset, SPECS, results_dir=tmp_path / "stream", max_memory=SMALL, log=lines.append,
                         **kwargs)
    return in_memory, streamed, lines


def test_solver_on_a_row_source_reaches_the_in_memory_optimum():
    torch.manual_seed(0)
    n, d, C = 1500, 40, 5
    y = torch.randint(0, C, (n,))
    X = (torch.randn(n, d) + 0.7 * torch.randn(C, d)[y]).double()
    l2 = torch.tensor([[1e-4, 1e-2, 1.0]], dtype=torch.float64)
    for precondition in (None, "principal", "diagonal"):
        whole = fit_logreg(X[None], y[None], l2, tol=1e-7, precondition=precondition, max_iter=3000)
        source = RowSource(n, d, lambda: (X[lo : lo + 333] for lo in range(0, n, 333)), dtype=torch.float64)
        chunked = fit_logreg(source, y[None], l2, tol=1e-7, precondition=precondition, max_iter=3000)
        assert bool(whole.converged.all()) and bool(chunked.converged.all())
        assert float((whole.W - chunked.W).norm() / whole.W.norm()) < 1e-6
        assert float((whole.b - chunked.b).norm()) < 1e-6 * float(whole.b.norm()) + 1e-9
        assert source.passes[0] > 10  # each evaluation read the rows again


@pytest.mark.parametrize("dataset", ["dtd", "gtsrb"])
def test_streamed_default_probe_gives_the_in_memory_result(request, tmp_path, dataset):
    cache = request.getfixturevalue("big_toy" if dataset == "dtd" else "held_out_toy")
    in_memory, streamed, lines = _both(cache, tmp_path, "default", dataset)
    for whole, chunked in zip(in_memory, streamed):
        assert "streamed" not in whole["solver"]
        assert chunked["solver"]["streamed"]["chunk_rows"] == memory.MIN_CHUNK_ROWS
        assert chunked["solver"]["streamed"]["passes"] > 50
        assert chunked["selection"]["chosen"] == whole["selection"]["chosen"]
        np.testing.assert_allclose(chunked["selection"]["val_top1"], whole["selection"]["val_top1"], atol=1e-9)
        for metric in ("top1", "top5", "mean_per_class"):
            assert chunked["metrics"][metric] == pytest.approx(whole["metrics"][metric], abs=1e-9)
        # Both solves met the criterion (weights within 1e-5 of the optimum): their final losses agree closely.
        assert chunked["solver"]["refit"]["converged"] and whole["solver"]["refit"]["converged"]
        assert chunked["solver"]["refit"]["loss"] == pytest.approx(whole["solver"]["refit"]["loss"], rel=1e-6)
    assert any("cls[-4:]+patch[-1]: streaming features from the cache, 64 rows at a time" in line for line in lines)


def test_streamed_knn_and_ncc_give_the_in_memory_result(big_toy, tmp_path):
    in_memory, streamed, lines = _both(big_toy, tmp_path, ["knn", "ncc"])
    for whole, chunked in zip(in_memory, streamed):
        assert chunked["protocol"] == whole["protocol"]
        assert chunked["selection"] == whole["selection"]
        for metric, value in whole["metrics"].items():
            assert chunked["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    assert any("cls[-4:]+patch[-1]: k-NN over the bank in chunks of 64 rows" in line for line in lines)


def test_split_chunks_are_its_features_in_row_order(held_out_toy):
    caches = CacheSet(MODEL, "gtsrb", cache_dir=held_out_toy)
    train = caches.split(["train"])
    tr_rows, va_rows = stratified_holdout(train.labels, seed=3)
    spec = parse_spec("cls[-4:]+patch[-1]")
    for split in (train, train.subset(va_rows, "val"), train.subset(tr_rows, "train")):
        for rows in (7, 64, 10_000):
            chunks = list(split.chunks(spec, rows))
            assert all(len(c) <= rows for c in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks), split.features(spec))
        assert split.digest(spec, 7) == split.digest(spec, None)
    caches.close()


def test_memory_budget_parses_sizes_and_refuses_nonsense():
    assert memory.memory_budget("512M") == 512 << 20
    assert memory.memory_budget("1.5GiB") == 3 << 29
    assert memory.memory_budget("2048") == 2048
    assert memory.memory_budget(None) == memory.machine_memory() // 2
    for bad in ("lots", "0", "-1G", "12Q"):
        with pytest.raises(VTError, match="--max-memory"):
            memory.memory_budget(bad)
    assert memory.chunk_rows(1000, 10, 1 << 30, "logistic") is None  # fits: in memory
    assert memory.chunk_rows(1000, 10, 1 << 10, "logistic") == memory.MIN_CHUNK_ROWS


def test_cli_max_memory(big_toy, tmp_path, vt):
    ok = vt("probe", "-m", MODEL, "-d", "dtd", "-t", "cls[-1]", "-p", "knn", "--cache-dir", big_toy,
            "--results", tmp_path / "r", "--max-memory", "16K")
    assert ok.returncode == 0, ok.stderr
    assert "k-NN over the bank in chunks" in ok.stderr
    bad = vt("probe", "-m", MODEL, "-d", "dtd", "-t", "cls[-1]", "--cache-dir", big_toy, "--max-memory", "lots")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --max-memory must be a size such as 512M, 16G or a number of "
                                               "bytes, not 'lots'"]
