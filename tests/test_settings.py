"""One owner for extraction settings: picking caches and results by every setting that tells them apart,
files written before the redesign, the cache index, and the protocol registry (the ncc probe)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from vtbench.cache import find_cache, list_caches, verify_cache, write_cache
from vtbench.cache import index as cache_index
from vtbench.cli import main
from vtbench.errors import VTError
from vtbench.fewshot import run_fewshot
from vtbench.report.leaderboard import build_leaderboard, load_results
from vtbench.settings import FeatureSettings, SettingsQuery
from vtbench.transfer import run_probe

LEGACY = REPO / "tests" / "fixtures" / "legacy"
LEGACY_MODEL = "vit_tiny_patch16_224"
MODEL = "toy_vit"
CLASSES, DIM = 4, 6


def _meta(split: str, size: int = 32, dtype: str = "float32") -> dict:
    return {"format_version": 1, "model": MODEL, "model_kwargs": {}, "weights_sha256": "cd" * 32,
            "weights_source": "random-init", "transform": {"mode": "model", "input_size": [3, size, size]},
            "norm": True, "dtype": dtype, "dataset": "dtd:1", "split": split, "data_fingerprint": f"syn-{split}",
            "token_kinds": ["cls"], "precision": "fp32", "timm_version": "t", "torch_version": "t"}


def _write(root: Path, input_size: int = 32, dtype: str = "float32", shift: float = 0.0) -> None:
    """train/val/test caches of well separated classes; ``shift`` makes another set of features."""
    rng = np.random.default_rng(input_size)
    centres = rng.standard_normal((CLASSES, DIM)) * 3
    for split, per_class in (("train", 10), ("val", 4), ("test", 6)):
        labels = np.repeat(np.arange(CLASSES), per_class)
        feats = {("cls", b): (centres[labels] + rng.standard_normal((len(labels), DIM)) + shift * b).astype(np.float32)
                 for b in range(2)}
        write_cache(root, _meta(split, input_size, dtype), feats, labels, [f"{split}{i}" for i in range(len(labels))],
                    [f"c{c}" for c in range(CLASSES)])


def _vt(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("setting, values, flag", [("input_size", (32, 64), "--input-size"),
                                                   ("dtype", ("float16", "float32"), "--dtype")])
def test_probe_fewshot_leaderboard_and_plot_pick_by_setting(setting, values, flag, tmp_path, capsys):
    cache = tmp_path / "cache"
    for i, value in enumerate(values):
        _write(cache, **{setting: value}, shift=float(i))
    with pytest.raises(VTError, match=re.escape(flag)):
        run_probe(MODEL, "dtd", "cls[-1]", "knn", cache_dir=cache, results_dir=tmp_path / "r")
    results = tmp_path / "r"
    common = ["-m", MODEL, "-d", "dtd", "-t", "cls[-1]", "--cache-dir", str(cache), "--results", str(results)]
    tops = {}
    for value in values:
        code, out, err = _vt(["probe", *common, "-p", "knn", flag, str(value)], capsys)
        assert code == 0, err
        code, _, err = _vt(["fewshot", *common, "--sampler", "fixed", "--ways", "2", "--shots", "1", "--queries", "2",
                            "--classes", "all", "--episodes", "5", "--classifier", "ncc", flag, str(value)], capsys)
        assert code == 0, err
    table = load_results(results)
    assert len(table) == 4
    for value in values:
        picked = [r for r in table if SettingsQuery(**{setting: value}).matches(r)]
        assert len(picked) == 2 and {r["task"] for r in picked} == {"probe", "fewshot"}
        (cache_key,) = {ref["key"] for r in picked if r["task"] == "probe" for ref in r["caches"]["test"]}
        path = find_cache(MODEL, "dtd", "test", cache, settings=SettingsQuery(**{setting: value}))
        assert cache_key[:16] in path.name
        tops[value] = next(r["metrics"]["top1"] for r in picked if r["task"] == "probe")
        board = build_leaderboard(table, settings=SettingsQuery(**{setting: value}))
        assert [len(sec.rows) for sec in board.sections] == [1, 1]
        code, out, err = _vt(["leaderboard", str(results), "--format", "json", flag, str(value)], capsys)
        assert code == 0, err
        shown = json.loads(out)
        assert [len(sec["rows"]) for sec in shown["sections"]] == [1, 1]
        code, _, err = _vt(["plot", "bars", str(results), "-o", str(tmp_path / f"{value}.png"), flag, str(value)],
                           capsys)
        assert code == 0 and (tmp_path / f"{value}.png").stat().st_size > 0, err
    code, out, err = _vt(["leaderboard", str(results), flag, "7"], capsys)
    assert code == 2 and "no results from caches with" in err


def test_files_written_before_the_redesign_are_read_and_found_by_skip_existing(tmp_path):
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(LEGACY / "cache", cache)
    shutil.copytree(LEGACY / "results", results)
    for path, _ in list_caches(cache):
        assert verify_cache(path) == []  # the stored key is still the key of its identity fields
    stored = {(r["protocol"], r["tokens"]): r for r in load_results(results)}
    again = run_probe(LEGACY_MODEL, "digits", ["cls[-1]", "cls[-2:]+patch[-1]"], ["default", "knn"],
                      cache_dir=cache, results_dir=results, skip_existing=True)
    assert len(again) == 4 and all(r["skipped"] for r in again)
    for r in again:
        assert r["metrics"] == stored[(r["protocol"], r["tokens"])]["metrics"]
    (few,) = run_fewshot(LEGACY_MODEL, "digits", "cls[-1]", "md", classifier="ncc", episodes=20, classes="all",
                         cache_dir=cache, results_dir=results, skip_existing=True)
    assert few["skipped"] and few["metrics"] == stored[("fewshot-md", "cls[-1]")]["metrics"]
    board = build_leaderboard(load_results(results))
    assert board.to_markdown() == (LEGACY / "leaderboard.md").read_text()


def test_clean_settings_keep_their_ids_and_a_perturbation_makes_another():
    meta = json.loads(next((LEGACY / "results").rglob("*.json")).read_text())
    clean = FeatureSettings.of(meta)
    assert "perturbation" not in clean.fields()
    perturbed = FeatureSettings(**{**vars(clean), "perturbation": {"kind": "patchdrop", "ratio": 0.5}})
    assert perturbed.id != clean.id and perturbed.fields()["perturbation"]["ratio"] == 0.5
    # fp32 counts as unrecorded: a record without precision has the id of the same record with fp32
    assert FeatureSettings.of({**meta, "precision": None}).id == FeatureSettings.of({**meta, "precision": "fp32"}).id


def test_index_opens_each_cache_file_once(tmp_path, monkeypatch):
    _write(tmp_path)
    first = list_caches(tmp_path)
    assert len(first) == 3 and (tmp_path / cache_index.INDEX_NAME).is_file()
    opened = []
    real = cache_index._read_entry
    monkeypatch.setattr(cache_index, "_read_entry", lambda path, stamp: opened.append(path) or real(path, stamp))
    cache_index._memory.clear()  # a new process: only the index file is read
    assert list_caches(tmp_path) == first and opened == []
    (_, meta), *_ = first
    path = next(p for p, m in first if m["split"] == "test")
    path.unlink()  # a removed cache leaves the index; a new one is read
    _write(tmp_path, input_size=64)
    now = list_caches(tmp_path)
    assert len(now) == 5 and path not in {p for p, _ in now} and len(opened) == 3


def test_ncc_protocol_is_the_cosine_nearest_class_mean(tmp_path):
    _write(tmp_path / "cache")
    (rec,) = run_probe(MODEL, "dtd", "cls[-1]", "ncc", cache_dir=tmp_path / "cache", results_dir=tmp_path / "r")
    from vtbench.cache import open_cache

    def read(split):
        with open_cache(find_cache(MODEL, "dtd", split, tmp_path / "cache")) as c:
            return c.features("cls[-1]").astype(np.float64), c.labels

    (X, y), (Xt, yt) = read("train"), read("test")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    means = unit(np.stack([unit(X)[y == c].mean(0) for c in range(CLASSES)]))
    expected = 100 * np.mean((unit(Xt) @ means.T).argmax(1) == yt)
    assert rec["protocol"] == "ncc" and rec["metrics"]["top1"] == pytest.approx(expected)
    assert "val" not in rec["splits"] and rec["n"]["val"] == 0


def test_architecture_page_names_files_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:vtbench|tests|docs|benchmarks|configs)/[\w/.-]+\.(?:py|md|yaml))`", page))
    assert len(named) >= 15
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
