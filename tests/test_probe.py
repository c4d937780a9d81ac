"""`vt probe` / run_probe on synthetic caches (records, splits, batching, errors), and on real Lite0 DTD features."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vtbench import results as store
from vtbench.cli import main
from vtbench.errors import VTError
from vtbench.cache import find_cache, open_cache, write_cache
from vtbench.tokens import parse_spec
from vtbench.transfer import L2_GRID, run_probe
from vtbench.transfer import probe as probe_module
from vtbench.cache import CacheSet
from vtbench.transfer.features import stratified_holdout

MODEL = "toy_vit"
BLOCKS, DIM, CLASSES = 6, 8, 5
PER_CLASS = {"train": 12, "val": 6, "test": 8}


def _meta(dataset, split, weights="ab" * 32, transform="model", model=MODEL):
    return {
        "format_version": 1, "model": model, "model_kwargs": {}, "weights_sha256": weights, "weights_source": "random-init",
        "transform": transform if isinstance(transform, dict) else {"mode": transform}, "norm": True, "dtype": "float32",
        "dataset": dataset, "split": split, "data_fingerprint": f"synthetic-{split}", "token_kinds": ["cls", "patch"],
        "precision": "fp32", "timm_version": "test", "torch_version": "test",
    }


def write_toy(root, dataset="dtd:1", splits=("train", "val", "test"), per_class=None, seed=0, **meta):
    """cls/patch caches of a 6-block toy model: class mean + noise, growing cleaner with depth."""
    per_class = per_class or PER_CLASS
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, DIM)) * 1.5
    names = [f"class{c}" for c in range(CLASSES)]
    for split in splits:
        labels = np.repeat(np.arange(CLASSES), per_class[split])
        feats = {}
        for b in range(BLOCKS):
            noise = 3.0 - 0.4 * b
            feats[("cls", b)] = (means[labels] + noise * rng.normal(size=(len(labels), DIM))).astype(np.float32)
            feats[("patch", b)] = (0.5 * means[labels] + noise * rng.normal(size=(len(labels), DIM))).astype(np.float32)
        ids = [f"{split}/{i}.jpg" for i in range(len(labels))]
        write_cache(root, _meta(dataset, split, **meta), feats, labels, ids, names)
    return root


@pytest.fixture
def toy(tmp_path):
    return write_toy(tmp_path / "cache")


def test_token_spec_reads_exactly_the_concatenated_blocks(tmp_path):
    # Known values: block b, row i, column j holds b*1000 + i*10 + j.
    n = 6
    feats = {(kind, b): (b * 1000 + np.arange(n)[:, None] * 10 + np.arange(DIM)[None]).astype(np.float32) + off
             for b in range(BLOCKS) for kind, off in (("cls", 0.0), ("patch", 0.5))}
    labels = np.arange(n) % 2
    write_cache(tmp_path, _meta("dtd:1", "train"), feats, labels, [str(i) for i in range(n)], ["a", "b"])
    caches = CacheSet(MODEL, "dtd", cache_dir=tmp_path)
    split = caches.split(["train"])
    got = split.features(parse_spec("cls[-4:]"))
    assert got.shape == (n, 4 * DIM)
    np.testing.assert_array_equal(got, np.concatenate([feats[("cls", b)] for b in (2, 3, 4, 5)], axis=1))
    cache = open_cache(find_cache(MODEL, "dtd", "train", tmp_path))
    np.testing.assert_array_equal(got, np.concatenate([cache.block("cls", b) for b in range(2, 6)], axis=1))
    both = split.features(parse_spec("cls[-4:]+patch[-1]"))
    np.testing.assert_array_equal(both, np.concatenate([got, feats[("patch", 5)]], axis=1))
    # The held-out part of a split reads the same rows of every block.
    part = split.subset(np.array([1, 4]), "x").features(parse_spec("cls[-4:]"))
    np.testing.assert_array_equal(part, got[[1, 4]])
    caches.close()


def test_token_spec_blocks_are_checked_not_clamped():
    assert parse_spec("cls[-4:]").resolve({"cls": 6}) == [("cls", b) for b in (2, 3, 4, 5)]
    assert parse_spec("cls[0:6]+patch[-6]").resolve({"cls": 6, "patch": 6}) == [("cls", b) for b in range(6)] + [
        ("patch", 0)]
    for spec, message in (("cls[-4:]", "-4 is out of range; this cache has 3 'cls' blocks"),  # not the last four
                          ("cls[1:7]", "7 is out of range"), ("cls[3]", "block 3 is out of range"),
                          ("cls[2:2]", "selects no blocks")):
        with pytest.raises(VTError, match=re.escape(message)):
            parse_spec(spec).resolve({"cls": 3})


def test_default_knn_ipvit_records(toy, tmp_path):
    res = tmp_path / "res"
    recs = run_probe(MODEL, "dtd", ["cls[-1]", "cls[-4:]+patch[-1]"], ["default", "knn", "ipvit"],
                     cache_dir=toy, results_dir=res, device="cpu")
    assert [(r["protocol"], r["tokens"]) for r in recs] == [
        ("default", "cls[-1]"), ("default", "cls[-4:]+patch[-1]"), ("knn", "cls[-1]"), ("knn", "cls[-4:]+patch[-1]"),
        ("ipvit", "cls[-1]"), ("ipvit", "cls[-4:]+patch[-1]")]
    default, ens = recs[0], recs[1]
    assert default["task"] == "probe" and default["dataset"] == "dtd:1" and default["model"] == MODEL
    assert default["weights"] == {"source": "random-init", "sha256": "ab" * 32}
    assert default["splits"] == {"train": ["train"], "val": ["val"], "test": ["test"]}
    assert [c["split"] for c in default["caches"]["val"]] == ["val"] and len(default["caches"]["train"][0]["key"]) == 64
    assert default["n"] == {"train": 60, "val": 30, "test": 40}
    assert default["feature_dim"] == DIM and ens["feature_dim"] == 5 * DIM
    sel = ens["selection"]
    assert sel["grid"] == list(L2_GRID) and len(sel["val_top1"]) == len(L2_GRID) >= 8
    assert sel["chosen"] in L2_GRID and ens["metrics"]["val_top1"] == max(sel["val_top1"])
    assert len(ens["solver"]["selection"]["iterations"]) == len(L2_GRID) and ens["solver"]["refit"]["converged"]
    for r in recs:
        m = r["metrics"]
        assert 0 <= m["top1"] <= m["top5"] <= 100 and 0 <= m["mean_per_class"] <= 100
    assert ens["metrics"]["top1"] > 80  # the 4-block ensemble of this toy is nearly separable; chance is 20
    knn = recs[3]
    assert knn["selection"]["grid"] == [10, 20, 60] and knn["metrics"]["k"] == knn["selection"]["chosen"]
    assert knn["solver"]["backend"] in ("faiss-cpu", "torch") and "top1_k10" in knn["metrics"]
    ipvit = recs[5]
    assert ipvit["splits"] == {"train": ["train", "val"], "test": ["test"]} and ipvit["n"]["train"] == 90
    m = ipvit["metrics"]
    assert m["top1"] == m["top1_last_epoch"] == m["top1_per_epoch"][-1] and len(m["top1_per_epoch"]) == 10
    assert m["top1_max_over_epochs"] == max(m["top1_per_epoch"])
    # Stored one file per result, read back by the leaderboard's loader.
    table = store.load(res)
    assert len(table) == 6
    stored = json.loads(open(default["_path"]).read())
    assert stored["metrics"] == default["metrics"] and stored["selection"]["grid"] == list(L2_GRID)


def test_long_runs_say_how_far_they_are(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(probe_module, "PROGRESS_EVERY_S", 0.0)  # every epoch counts as long here
    lines = []
    run_probe(MODEL, "dtd", ["cls[-1]", "cls[0]"], ["default", "ipvit"], cache_dir=toy, results_dir=tmp_path,
              device="cpu", log=lines.append)
    assert "  1/2 specs (cls[-1]) after" in "\n".join(lines) and any(line.endswith("s left") for line in lines)
    epochs = [line for line in lines if line.startswith("  epoch ")]
    total = probe_module.IPVIT["epochs"]
    assert [e.split()[1] for e in epochs] == [f"{k}/{total}" for k in range(1, total)]
    assert all("s left" in e for e in epochs)


def test_specs_batched_together_equal_each_alone(toy, tmp_path):
    specs = ["cls[-1]", "cls[2]", "cls[-4:]+patch[-1]", "patch[0:2]"]
    together = run_probe(MODEL, "dtd", specs, cache_dir=toy, results_dir=tmp_path / "a", device="cpu")
    for spec, rec in zip(specs, together):
        (alone,) = run_probe(MODEL, "dtd", [spec], cache_dir=toy, results_dir=tmp_path / "b", device="cpu")
        assert alone["selection"] == rec["selection"] and alone["metrics"] == rec["metrics"]
        assert alone["solver"]["selection"] == rec["solver"]["selection"]


def test_specs_with_identical_features_are_solved_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), 10)
    cls = {("cls", b): (3 * rng.normal(size=(len(labels), DIM)) + labels[:, None] * b).astype(np.float32) for b in range(2)}
    for split in ("train", "val", "test"):
        meta = dict(_meta("dtd:1", split), token_kinds=["cls", "prelogits"])
        feats = {**cls, ("prelogits", 0): cls[("cls", 1)]}  # a ViT's prelogits: its last class token
        write_cache(tmp_path / "cache", meta, feats, labels, [f"{split}/{i}" for i in range(len(labels))],
                    [f"c{c}" for c in range(CLASSES)])
    solved, lines = [], []
    real = probe_module._logistic_spec
    monkeypatch.setattr(probe_module, "_logistic_spec", lambda task, spec, backend: solved.append(str(spec)) or
                        real(task, spec, backend))
    recs = run_probe(MODEL, "dtd", ["cls[-1]", "cls[0]", "prelogits"], cache_dir=tmp_path / "cache",
                     results_dir=tmp_path / "r", device="cpu", log=lines.append)
    assert solved == ["cls[-1]", "cls[0]"]
    assert "  prelogits: the same features as cls[-1], whose result it shares" in lines
    last, first, pre = recs
    assert pre["tokens"] == "prelogits" and pre["timings"]["same_features_as"] == "cls[-1]"
    assert pre["metrics"] == last["metrics"] and pre["selection"] == last["selection"]
    (alone,) = run_probe(MODEL, "dtd", ["prelogits"], cache_dir=tmp_path / "cache", results_dir=tmp_path / "alone",
                         device="cpu")
    assert alone["metrics"] == pre["metrics"] and alone["selection"] == pre["selection"]
    assert first["metrics"] != last["metrics"]


def test_seeds_run_each_seed_as_alone(tmp_path, vt):
    cache = write_toy(tmp_path / "cache", dataset="gtsrb", splits=("train", "test"))
    kw = dict(cache_dir=cache, device="cpu")
    recs = run_probe(MODEL, "gtsrb", "cls[-1]", seeds=[0, 2], results_dir=tmp_path / "a", **kw)
    assert [r["seed"] for r in recs] == [0, 2] and recs[0]["splits"]["val"] != recs[1]["splits"]["val"]
    (alone,) = run_probe(MODEL, "gtsrb", "cls[-1]", seed=2, results_dir=tmp_path / "b", **kw)
    assert alone["metrics"] == recs[1]["metrics"] and alone["selection"] == recs[1]["selection"]
    with pytest.raises(VTError, match="seeds must be one or more integers >= 0"):
        run_probe(MODEL, "gtsrb", "cls[-1]", seeds=[-1], results_dir=tmp_path / "a", **kw)
    run = vt("probe", "-m", MODEL, "-d", "gtsrb", "--cache-dir", cache, "--results", tmp_path / "c",
             "-t", "cls[-1]", "--seeds", "0", "1", "--device", "cpu")
    assert run.returncode == 0 and len(store.load(tmp_path / "c")) == 2


def test_holdout_validation_when_no_official_val(tmp_path):
    cache = write_toy(tmp_path / "cache", dataset="gtsrb", splits=("train", "test"))
    a = run_probe(MODEL, "gtsrb", "cls[-1]", cache_dir=cache, results_dir=tmp_path / "r", device="cpu")[0]
    assert a["splits"]["val"] == "20% of train (stratified, seed 0)" and a["splits"]["train"] == ["train"]
    assert a["n"] == {"train": 50, "val": 10, "test": 40} and "val" not in a["caches"]
    again = run_probe(MODEL, "gtsrb", "cls[-1]", cache_dir=cache, results_dir=tmp_path / "r", device="cpu")[0]
    assert again["metrics"] == a["metrics"] and again["selection"] == a["selection"]
    other = run_probe(MODEL, "gtsrb", "cls[-1]", seed=1, cache_dir=cache, results_dir=tmp_path / "r", device="cpu")[0]
    assert other["splits"]["val"].endswith("seed 1)") and other["seed"] == 1
    assert len(store.load(tmp_path / "r")) == 2  # same identity overwritten, new seed added


def test_stratified_holdout():
    labels = np.repeat(np.arange(4), [10, 5, 2, 3])
    train, val = stratified_holdout(labels, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(20))
    assert np.bincount(labels[val]).tolist() == [2, 1, 1, 1]
    np.testing.assert_array_equal(val, stratified_holdout(labels, seed=0)[1])
    with pytest.raises(VTError, match="fewer than 2"):
        stratified_holdout(np.array([0, 0, 1]), seed=0)


def test_per_block_and_skip_existing(toy, tmp_path):
    res = tmp_path / "res"
    recs = run_probe(MODEL, "dtd", [], per_block=True, cache_dir=toy, results_dir=res, device="cpu")
    assert [r["tokens"] for r in recs] == [f"cls[{b}]" for b in range(BLOCKS)] + [f"patch[{b}]" for b in range(BLOCKS)]
    top1 = [r["metrics"]["top1"] for r in recs[:BLOCKS]]
    assert top1[-1] > top1[0]  # the toy's later blocks are cleaner
    again = run_probe(MODEL, "dtd", ["cls[5]"], per_block=True, skip_existing=True, cache_dir=toy, results_dir=res)
    assert sorted(r["tokens"] for r in again) == sorted(r["tokens"] for r in recs) and all(r["skipped"] for r in again)
    assert {r["tokens"]: r["metrics"] for r in again} == {r["tokens"]: r["metrics"] for r in recs}
    more = run_probe(MODEL, "dtd", ["cls[-2:]"], per_block=True, skip_existing=True, cache_dir=toy, results_dir=res)
    (new,) = [r for r in more if not r.get("skipped")]
    assert new["tokens"] == "cls[-2:]" and len(more) == 1 + len(recs)


def test_cli_readme_example_and_table(toy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["probe", "--model", MODEL, "--dataset", "dtd", "--tokens", "cls[-1]", "cls[-4:]", "cls[-4:]+patch[-1]",
              "--cache-dir", str(toy), "--results", str(tmp_path / "res"), "--device", "cpu"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["protocol", "tokens", "dim", "top1"]
    assert [ln.split()[1] for ln in lines[1:4]] == ["cls[-1]", "cls[-4:]", "cls[-4:]+patch[-1]"]
    assert len(store.load(tmp_path / "res")) == 3


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line_exit_2(toy, tmp_path, capsys):
    base = ["probe", "--model", MODEL, "--dataset", "dtd", "--cache-dir", str(toy), "--results", str(tmp_path / "res")]
    err = _cli_error(base + ["--tokens", "cls[-1]", "bogus[1]"], capsys)
    assert "bogus[1]" in err
    err = _cli_error(base + ["--tokens", "cls[-1]", "cls[20]"], capsys)
    assert "out of range" in err and "6" in err
    err = _cli_error(base + ["--tokens", "stage[-1]"], capsys)
    assert "no 'stage'" in err
    assert not (tmp_path / "res").exists()  # every spec is checked before any training
    err = _cli_error(base[:4] + ["cub", "--cache-dir", str(toy), "--tokens", "cls[-1]"], capsys)
    assert "vt extract --model toy_vit --dataset cub --split train" in err
    err = _cli_error(base + ["--tokens", "cls[-1]", "--protocol", "magic"], capsys)
    assert "unknown protocol" in err


def test_cli_errors_incompatible_caches_and_tiny_classes(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    write_toy(mixed, splits=("train", "val"))
    write_toy(mixed, splits=("test",), transform="ipvit")
    args = ["probe", "-m", MODEL, "-d", "dtd", "-t", "cls[-1]", "--cache-dir", str(mixed), "--results", str(tmp_path / "r")]
    assert "differ in transform" in _cli_error(args, capsys)
    weights = tmp_path / "weights"
    write_toy(weights, splits=("train", "val"))
    write_toy(weights, splits=("test",), weights="cd" * 32)
    args[args.index("--cache-dir") + 1] = str(weights)
    assert "differ in weights_sha256" in _cli_error(args, capsys)
    tiny = tmp_path / "tiny"
    write_toy(tiny, dataset="gtsrb", splits=("train", "test"), per_class={"train": 1, "test": 2})
    args = ["probe", "-m", MODEL, "-d", "gtsrb", "-t", "cls[-1]", "--cache-dir", str(tiny), "--results", str(tmp_path / "r")]
    assert "5 classes have fewer than 2 training images (class0, class1, class2, class3, class4), too few" in (
        _cli_error(args, capsys))


@pytest.mark.shared
@pytest.mark.slow
def test_real_dtd_default_matches_sklearn(lite0_cache_dir, tmp_path):
    recs = run_probe("tf_efficientnet_lite0", "dtd", ["prelogits"], ["default", "sklearn"],
                     cache_dir=lite0_cache_dir, results_dir=tmp_path, device="cpu")
    ours, ref = (r["metrics"]["top1"] for r in recs)
    assert abs(ours - ref) <= 1.0
    assert ours > 70  # 10 classes: chance is 10%; sklearn on these features gives about 85%
    assert all(recs[0]["solver"]["selection"]["converged"]) and recs[0]["solver"]["refit"]["converged"]


def test_other_extraction_settings_are_other_results_never_reused(tmp_path):
    """The same model and weights on caches made with another transform: a second result beside the first,
    not an overwrite, and --skip-existing does not pass one off as the other."""
    from vtbench.report.leaderboard import build_leaderboard

    write_toy(tmp_path / "cache")
    write_toy(tmp_path / "cache", transform="ipvit", seed=1)  # other features for the same images
    kw = dict(cache_dir=tmp_path / "cache", results_dir=tmp_path / "r", skip_existing=True)
    (model_tf,) = run_probe(MODEL, "dtd", "cls[-1]", transform="model", **kw)
    (ipvit_tf,) = run_probe(MODEL, "dtd", "cls[-1]", transform="ipvit", **kw)
    assert not ipvit_tf.get("skipped") and ipvit_tf["_path"] != model_tf["_path"]
    assert ipvit_tf["metrics"]["top1"] != model_tf["metrics"]["top1"]
    assert store.identity(ipvit_tf)["features"] != store.identity(model_tf)["features"]
    (again,) = run_probe(MODEL, "dtd", "cls[-1]", transform="ipvit", **kw)  # now stored: skipped
    assert again["skipped"] and again["_path"] == ipvit_tf["_path"] and again["metrics"] == ipvit_tf["metrics"]

    table = store.load(tmp_path / "r")
    assert len(table) == 2
    (section,) = build_leaderboard(table).sections
    assert section.show_features and sorted(r.features_label for r in section.rows) == ["ipvit, float32",
                                                                                       "model, float32"]
    assert "| Features |" in build_leaderboard(table).to_markdown()

    # Per-block curves of the two settings are two lines each (cls, patch), labelled by their setting.
    from vtbench.report.plots import plot_per_block

    for transform in ("model", "ipvit"):
        run_probe(MODEL, "dtd", per_block=True, transform=transform, **kw)
    fig = plot_per_block(store.load(tmp_path / "r"), "dtd", tmp_path / "pb.png")
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == [
        f"{MODEL} · ipvit, float32 · cls", f"{MODEL} · ipvit, float32 · patch",
        f"{MODEL} · model, float32 · cls", f"{MODEL} · model, float32 · patch"]

    # Caches that differ only in a transform detail are not picked between silently.
    write_toy(tmp_path / "cache", transform={"mode": "model", "input_size": [3, 160, 160]}, seed=2)
    with pytest.raises(VTError, match=r"^2 different caches match .*transform model 160x160 no crop None.*; weights "
                                      r".*transform model \? no crop None.*or remove the one you do not want"):
        run_probe(MODEL, "dtd", "cls[-1]", transform="model", **kw)


def test_skip_existing_finds_results_stored_under_their_earlier_name(tmp_path):
    """Stores written before the identity named the extraction settings are still found, when they match."""
    write_toy(tmp_path / "cache")
    kw = dict(cache_dir=tmp_path / "cache", results_dir=tmp_path / "r", skip_existing=True)
    (rec,) = run_probe(MODEL, "dtd", "cls[-1]", **kw)
    ident = store.identity(rec)
    legacy = store.result_path(tmp_path / "r", {k: v for k, v in ident.items() if k not in ("features", "data")})
    legacy.parent.mkdir(parents=True, exist_ok=True)
    Path(rec["_path"]).rename(legacy)
    assert store.stored_path(tmp_path / "r", rec) == legacy
    (again,) = run_probe(MODEL, "dtd", "cls[-1]", **kw)  # found under the earlier name: skipped
    assert again["skipped"] and again["_path"] == str(legacy)
    # ... but not for other extraction settings
    assert store.stored_path(tmp_path / "r", dict(rec, dtype="float16")) is None
    # ... nor for other data: a record stored before the identity named the data counts only for its own caches
    other = {split: [dict(ref, key="0" * 64, data_fingerprint="f" * 64) for ref in refs]
             for split, refs in rec["caches"].items()}
    assert store.stored_path(tmp_path / "r", dict(rec, caches=other)) is None
