"""`vt fewshot` / run_fewshot end to end on synthetic caches, plus real Lite0 features of shared Caltech-101."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtbench.cli import main
from vtbench.errors import VTError
from vtbench.cache import find_cache, open_cache, write_cache
from vtbench.fewshot import (
    FixedSampler,
    MetaDatasetSampler,
    confidence_interval,
    episode_accuracies,
    run_fewshot,
    sample_episodes,
)

MODEL = "toy_model"


def _meta(dataset: str, split: str, weights: str = "ab" * 32) -> dict:
    return {
        "format_version": 1, "model": MODEL, "model_kwargs": {}, "weights_sha256": weights,
        "weights_source": "random-init", "transform": {"mode": "model"}, "norm": True, "dtype": "float32",
        "dataset": dataset, "split": split, "data_fingerprint": f"synthetic-{split}", "token_kinds": ["cls"],
        "precision": "fp32", "timm_version": "test", "torch_version": "test",
    }


def write_synthetic(root, dataset="aircraft", num_classes=40, per_split=None, dim=24, noise=2.0,
                    weights="ab" * 32, drop=(), seed=0):
    """Caches of two cls blocks for a toy model: class-mean + noise features, 8 train and 4 test images per class."""
    per_split = per_split or {"train": 8, "test": 4}
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 2
    class_names = [f"class{c:03d}" for c in range(num_classes)]
    for split, per_class in per_split.items():
        labels = np.repeat(np.arange(num_classes), per_class)
        ids = [f"{split}/{class_names[c]}/{i}.jpg" for c, i in zip(labels, np.tile(np.arange(per_class), num_classes))]
        keep = [i for i, image_id in enumerate(ids) if image_id not in drop]
        labels, ids = labels[keep], [ids[i] for i in keep]
        feats = {("cls", b): (means[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32)
                 for b in range(2)}
        write_cache(root, _meta(dataset, split, weights), feats, labels, ids, class_names)
    return root


@pytest.fixture
def caches(tmp_path):
    return write_synthetic(tmp_path / "caches")


def test_md_run_records_and_saves(caches, tmp_path):
    (rec,) = run_fewshot(MODEL, "aircraft", "cls[-1]", "md", episodes=40, cache_dir=caches, results_dir=tmp_path / "res")
    assert rec["task"] == "fewshot" and rec["protocol"] == "fewshot-md" and rec["variant"] == "lr+40ep"
    m = rec["metrics"]
    accs = np.array(rec["episode_accuracies"])
    assert m["episodes"] == 40 == len(accs)
    assert m["accuracy"] == pytest.approx(accs.mean(), abs=1e-3)
    assert m["ci95"] == pytest.approx(1.96 * accs.std() / np.sqrt(40), abs=1e-3)
    assert m["accuracy"] > 80, "well separated classes"
    fs = rec["fewshot"]
    # aircraft's test classes: 15/100 of the 40 toy classes; images of both extracted splits.
    assert fs["classes"]["subset"] == "test" and fs["classes"]["num_classes"] == 6
    assert rec["splits"] == {"episodes": ["train", "test"]} and fs["pool_images"] == 40 * 12
    assert fs["episodes_source"] == {"seed": 0, "episodes": 40}
    assert 5 <= fs["mean_ways"] <= 6 and fs["mean_query"] == pytest.approx(fs["mean_ways"] * 6)
    assert fs["classifier"]["C"] == 1.0 and fs["classifier"]["l2"] == "1/(C*n_support)"
    # The record states the tolerance the episodes were actually solved to, and that they met it.
    from vtbench.fewshot.classifiers import LR_TOL
    assert fs["classifier"]["tol"] == LR_TOL and "tol" in fs["classifier"]["criterion"]
    assert fs["classifier"]["converged_fraction"] == 1.0 and fs["classifier"]["mean_iterations"] >= 1
    assert rec["weights"]["sha256"] == "ab" * 32 and len(rec["caches"]["episodes"]) == 2
    stored = json.loads(open(rec["_path"]).read())
    assert stored["metrics"] == m and stored["variant"] == "lr+40ep"


def test_ci_formula():
    mean, ci, std = confidence_interval([0.5, 1.0, 0.75, 0.25])
    assert mean == 62.5 and std == pytest.approx(np.std([50, 100, 75, 25]))
    assert ci == pytest.approx(1.96 * np.std([50, 100, 75, 25], ddof=0) / 2)


def test_same_seed_is_bit_identical_and_seed_changes_episodes(caches, tmp_path):
    kw = dict(classifier=["lr", "ncc"], episodes=30, cache_dir=caches, save=False)
    a = run_fewshot(MODEL, "aircraft", "cls[-2:]", "md", **kw, save_episodes=tmp_path / "a.json")
    b = run_fewshot(MODEL, "aircraft", "cls[-2:]", "md", **kw, save_episodes=tmp_path / "b.json")
    c = run_fewshot(MODEL, "aircraft", "cls[-2:]", "md", **kw, seed=1)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    for x, y in zip(a, b):
        assert x["episode_accuracies"] == y["episode_accuracies"] and x["metrics"] == y["metrics"]
    assert a[0]["episode_accuracies"] != c[0]["episode_accuracies"]
    assert [r["variant"] for r in a] == ["lr+30ep", "ncc+30ep"]


def test_save_and_replay_on_another_model(caches, tmp_path):
    eps = tmp_path / "eps.json"
    seeded = run_fewshot(MODEL, "aircraft", "cls[-1]", "fixed", shots=[1, 5], queries=3, episodes=20,
                         classifier="ncc", cache_dir=caches, save=False, save_episodes=eps)
    assert [r["protocol"] for r in seeded] == ["fewshot-5w1s", "fewshot-5w5s"]
    doc = json.loads(eps.read_text())
    assert doc["format"] == "vtbench-episodes/1" and doc["dataset"] == "aircraft"
    assert [s["sampler"] for s in doc["episode_sets"]] == [
        {"name": "fixed", "ways": 5, "shots": 1, "queries": 3}, {"name": "fixed", "ways": 5, "shots": 5, "queries": 3}]
    first = doc["episode_sets"][1]["episodes"][0]
    assert len(first["classes"]) == 5 and all(len(s) == 5 for s in first["support"])
    assert all(len(q) == 3 for q in first["query"])

    replayed = run_fewshot(MODEL, "aircraft", "cls[-1]", episodes=str(eps), classifier="ncc", cache_dir=caches,
                           save=False)
    for x, y in zip(seeded, replayed):
        assert x["episode_accuracies"] == y["episode_accuracies"]
        assert y["fewshot"]["episodes_source"]["sha256"] and y["variant"].startswith("ncc+file-")

    # The file fixes the sampling: options that would be ignored are refused instead.
    with pytest.raises(VTError, match=r"replays that file's episodes, which fix the sampler, classes and seed; "
                                      r"drop --sampler, --shots, --seed$"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", "md", episodes=eps, shots=[1], seed=3, cache_dir=caches)

    # The same episodes on another model's caches: the features differ, the episodes do not.
    other = write_synthetic(tmp_path / "other", weights="cd" * 32, noise=3.0, seed=1)
    on_other = run_fewshot(MODEL, "aircraft", "cls[-1]", episodes=eps, classifier="ncc", cache_dir=other, save=False)
    assert on_other[1]["fewshot"]["mean_support"] == 25 and on_other[1]["weights"]["sha256"] == "cd" * 32

    # Caches that lack some of the episodes' images cannot replay them.
    partial = write_synthetic(tmp_path / "partial", drop={first["query"][2][0]})
    with pytest.raises(VTError, match="not in the caches"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", episodes=eps, classifier="ncc", cache_dir=partial, save=False)


def test_skip_existing_and_classes_all(caches, tmp_path):
    kw = dict(classifier="ncc", episodes=10, cache_dir=caches, results_dir=tmp_path / "res")
    (first,) = run_fewshot(MODEL, "aircraft", "cls[-1]", "md", classes="all", **kw)
    assert first["variant"] == "ncc+10ep+classes-all" and first["fewshot"]["classes"]["num_classes"] == 40
    (again,) = run_fewshot(MODEL, "aircraft", "cls[-1]", "md", classes="all", skip_existing=True, **kw)
    assert again["skipped"] and again["metrics"] == first["metrics"]


def test_classes_given_are_named_where_they_are_the_default_too(tmp_path):
    root = tmp_path / "imgs"
    caches = write_synthetic(tmp_path / "caches", dataset=f"imagefolder:{root}", num_classes=8)
    kw = dict(episodes=10, classifier="ncc", cache_dir=caches, save=False)
    (implicit,) = run_fewshot(MODEL, f"imagefolder:{root}", "cls[0]", "fixed", shots=1, queries=2, **kw)
    (explicit,) = run_fewshot(MODEL, f"imagefolder:{root}", "cls[0]", "fixed", shots=1, queries=2, classes="all", **kw)
    assert implicit["variant"] == "ncc+10ep+q2" and explicit["variant"] == "ncc+10ep+classes-all+q2"
    assert explicit["metrics"] == implicit["metrics"]


def test_long_runs_say_how_far_they_are(caches, monkeypatch):
    import vtbench.fewshot.run as fewshot_run

    monkeypatch.setattr(fewshot_run, "PROGRESS_EVERY_S", 0.0)
    lines = []
    run_fewshot(MODEL, "aircraft", ["cls[-1]", "cls[0]"], classifier=["ncc", "lr"], episodes=5, cache_dir=caches,
                save=False, log=lines.append)
    assert [line.split(" (")[0] for line in lines] == ["  1/4 results", "  2/4 results", "  3/4 results"]
    assert all("s left" in line for line in lines)


def test_seeds_run_each_seed(caches, tmp_path):
    recs = run_fewshot(MODEL, "aircraft", "cls[-1]", classifier="ncc", episodes=10, seeds=[0, 1],
                       cache_dir=caches, results_dir=tmp_path / "res")
    assert [r["seed"] for r in recs] == [0, 1] and recs[0]["episode_accuracies"] != recs[1]["episode_accuracies"]
    (alone,) = run_fewshot(MODEL, "aircraft", "cls[-1]", classifier="ncc", episodes=10, seed=1, cache_dir=caches,
                           save=False)
    assert alone["episode_accuracies"] == recs[1]["episode_accuracies"]
    with pytest.raises(VTError, match="not both"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", seed=1, seeds=[0], cache_dir=caches)


def test_generic_dataset_defaults_to_all_classes_and_split_restricts(tmp_path):
    root = tmp_path / "imgs"
    caches = write_synthetic(tmp_path / "caches", dataset=f"imagefolder:{root}", num_classes=8)
    (rec,) = run_fewshot(MODEL, f"imagefolder:{root}", "cls[0]", "fixed", shots=1, queries=2, episodes=10,
                         classifier="ncc", split="test", cache_dir=caches, save=False)
    assert rec["fewshot"]["classes"]["subset"] == "all" and rec["splits"] == {"episodes": ["test"]}
    assert rec["fewshot"]["pool_images"] == 8 * 4 and rec["variant"] == "ncc+10ep+q2+splits-test"


def test_errors(caches, tmp_path):
    with pytest.raises(VTError, match="vt extract --model other"):
        run_fewshot("other", "aircraft", "cls[-1]", cache_dir=caches)
    with pytest.raises(VTError, match="^aircraft has no split 'extra'; valid splits: train, val, trainval, test$"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", split=["test", "extra"], cache_dir=caches)
    # 12 images per class cannot give 5 shots + 15 queries
    with pytest.raises(VTError, match="needs at least 5 classes with >= 20 images"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", "fixed", shots=5, cache_dir=caches, save=False)
    with pytest.raises(VTError, match="--center applies to the ncc classifier only"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", center=True, cache_dir=caches)
    with pytest.raises(VTError, match="unknown sampler"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", "random", cache_dir=caches)
    # options md does not use are refused rather than ignored
    with pytest.raises(VTError, match=r"^--ways applies to the fixed sampler only; add --sampler fixed"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", ways=3, cache_dir=caches)
    with pytest.raises(VTError, match=r"^--shots, --queries apply to the fixed sampler only"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", "md", shots=[1], queries=5, cache_dir=caches)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(VTError, match="not a vtbench episodes file"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", episodes=tmp_path / "bad.json", cache_dir=caches)


def test_a_class_split_too_small_for_the_sampler_points_to_classes_all(tmp_path):
    # 20 aircraft classes scale Meta-Dataset's 70/15/15 to 14/3/3: three test classes, fewer than md's 5 ways.
    caches = write_synthetic(tmp_path / "caches", num_classes=20)
    with pytest.raises(VTError, match=r"aircraft's test classes give 3 of 3 \(its 20 classes split 14/3/3 "
                                      r"train/val/test\); pass --classes all"):
        run_fewshot(MODEL, "aircraft", "cls[-1]", "md", episodes=5, classifier="ncc", cache_dir=caches, save=False)
    (rec,) = run_fewshot(MODEL, "aircraft", "cls[-1]", "md", episodes=5, classifier="ncc", classes="all",
                         cache_dir=caches, save=False)
    assert rec["fewshot"]["classes"]["num_classes"] == 20


def test_cli(caches, tmp_path, capsys):
    args = ["fewshot", "-m", MODEL, "-d", "aircraft", "--tokens", "cls[-1]", "cls[-2:]", "--sampler", "fixed",
            "--shots", "1", "5", "--queries", "3", "--episodes", "12", "--classifier", "ncc",
            "--cache-dir", str(caches), "--results", str(tmp_path / "res")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("+-" in line for line in lines)
    assert "cls[-2:] fewshot-5w5s ncc+12ep+q3" in lines[-1]
    with pytest.raises(SystemExit) as exc:
        main(["fewshot", "-m", MODEL, "-d", "aircraft", "--sampler", "fixed", "--shots", "5",
              "--cache-dir", str(caches)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the 'fixed' sampler needs at least 5 classes") and "\n" not in err


def test_batched_lr_matches_sklearn_per_episode():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 40)
    feats = (rng.normal(size=(30, 64))[labels] + 1.5 * rng.normal(size=(len(labels), 64))).astype(np.float32)
    episodes = (sample_episodes(labels, range(30), MetaDatasetSampler(), 6, seed=0)
                + sample_episodes(labels, range(30), FixedSampler(5, 5, 15), 6, seed=0))
    ours = episode_accuracies(feats, episodes, "lr", C=1.0, device="cpu")
    assert ours.converged.all()
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    want = []
    for ep in episodes:
        clf = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(normed[ep.support], ep.support_labels)
        want.append((clf.predict(normed[ep.query]) == ep.query_labels).mean())
    np.testing.assert_allclose(ours.accuracy, want, atol=1 / 150)


@pytest.mark.shared
def test_ncc_on_real_lite0_caltech101(lite0_cache_dir, shared_data):
    dataset = f"imagefolder:{shared_data / 'caltech101'}"
    cache = open_cache(find_cache("tf_efficientnet_lite0", dataset, "test", lite0_cache_dir))
    feats, labels = cache.features("prelogits"), cache.labels
    episodes = sample_episodes(labels, range(101), FixedSampler(5, 5, 5), 200, seed=0)
    ncc = episode_accuracies(feats, episodes, "ncc", device="cpu").accuracy
    assert ncc.mean() > 0.8, f"ImageNet features on Caltech-101 5-way 5-shot: {ncc.mean():.3f} (chance 0.2)"
    # Batched lr on the same real episodes agrees with scikit-learn, episode by episode.
    from sklearn.linear_model import LogisticRegression

    few = episodes[:8]
    ours = episode_accuracies(feats, few, "lr", device="cpu").accuracy
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    want = [(LogisticRegression(C=1.0, max_iter=5000).fit(normed[e.support], e.support_labels)
             .predict(normed[e.query]) == e.query_labels).mean() for e in few]
    np.testing.assert_allclose(ours, want, atol=1 / 25 + 1e-9)


def _lr_logits(feats, episodes, C=1.0):
    """Logits of the batched lr path for ``episodes`` padded into one batch (rows back in episode order)."""
    import torch

    from vtbench.fewshot import classifiers as cl

    x = torch.nn.functional.normalize(torch.as_tensor(feats), dim=1)
    x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    batch = cl.EpisodeBatch.pad(episodes, torch.device("cpu"), len(feats))
    logits, _, converged = cl._lr_scores(cl._Kernels(x, episodes, len(feats)), batch, C)
    assert converged.all()
    return [logits[i, : len(e.query), : e.ways].numpy() for i, e in enumerate(episodes)]


def _sklearn_proba(feats, ep, C):
    from sklearn.linear_model import LogisticRegression

    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(normed[ep.support], ep.support_labels)
    return clf.predict_proba(normed[ep.query])


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


@pytest.mark.parametrize("pool_gram", [True, False])
@pytest.mark.parametrize("C", [1.0, 10.0])
def test_kernel_lr_matches_sklearn_probabilities_in_a_padded_batch(monkeypatch, pool_gram, C):
    """Mixed ways/shots/queries padded into one batch, s < d: the kernel basis, both ways of getting the kernels."""
    from vtbench.fewshot import classifiers as cl

    monkeypatch.setattr(cl, "POOL_GRAM_BYTES", 1 << 30 if pool_gram else 0)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 10)
    feats = (rng.normal(size=(12, 96))[labels] + 1.2 * rng.normal(size=(len(labels), 96))).astype(np.float32)
    episodes = (sample_episodes(labels, range(12), MetaDatasetSampler(max_ways=8, max_support=60), 3, seed=2)
                + sample_episodes(labels, range(12), FixedSampler(3, 2, 4), 2, seed=3))
    sizes = [len(e.support) for e in episodes]
    assert max(sizes) < 96 and len(set(sizes)) > 2 and len({e.ways for e in episodes}) > 1
    for ep, logits in zip(episodes, _lr_logits(feats, episodes, C)):
        np.testing.assert_allclose(_softmax(logits.astype(np.float64)), _sklearn_proba(feats, ep, C), atol=3e-3)


def test_lr_falls_back_when_support_reaches_the_dim_or_duplicates():
    from vtbench.fewshot import classifiers as cl
    from vtbench.fewshot.samplers import make_episode

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), 12)
    feats = (rng.normal(size=(6, 16))[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32)
    # s >= d: 6 ways x 4 shots = 24 support rows > 16 dims, solved on the features.
    (big,) = sample_episodes(labels, range(6), FixedSampler(6, 4, 5), 1, seed=0)
    # Duplicate support features (rows 0 and 1 identical): the Cholesky check sends it to the direct path.
    feats[1] = feats[0]
    # (3 ways: scikit-learn fits 2-class problems as one binary logistic regression, a different penalty.)
    dup = make_episode([0, 1, 2], [np.array([0, 1, 2]), np.array([12, 13, 14]), np.array([24, 25])],
                       [np.array([3, 4]), np.array([15, 16]), np.array([26, 27])])
    import torch

    x = torch.nn.functional.normalize(torch.as_tensor(feats), dim=1)
    batch = cl.EpisodeBatch.pad([dup], torch.device("cpu"), 0)
    k = cl._Kernels(torch.cat([x, x.new_zeros(1, 16)]), [dup], len(feats))
    assert not bool(cl._kernel_basis(k(batch), batch.support_mask).ok[0])
    for ep in (big, dup):
        (logits,) = _lr_logits(feats, [ep])
        np.testing.assert_allclose(_softmax(logits.astype(np.float64)), _sklearn_proba(feats, ep, 1.0), atol=3e-3)
    acc = episode_accuracies(feats, [big, dup], "lr", device="cpu")
    assert acc.converged.all() and (acc.accuracy >= 0).all()


def test_lr_is_deterministic():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(20), 15)
    feats = (rng.normal(size=(20, 48))[labels] + 2 * rng.normal(size=(len(labels), 48))).astype(np.float32)
    episodes = sample_episodes(labels, range(20), MetaDatasetSampler(), 10, seed=0)
    a = episode_accuracies(feats, episodes, "lr", device="cpu")
    b = episode_accuracies(feats, episodes, "lr", device="cpu")
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    np.testing.assert_array_equal(a.iterations, b.iterations)


def test_lr_batches_cut_by_ways_where_padding_would_dominate():
    from types import SimpleNamespace

    from vtbench.fewshot import classifiers as cl

    def episode(support, ways):
        return SimpleNamespace(support=np.zeros(support), query=np.zeros(10 * ways), ways=ways)

    rng = np.random.default_rng(0)
    # Similar support sizes, ways either 5 or 50: one batch by size, padded to 50 ways throughout.
    episodes = [episode(int(s), int(w)) for s, w in zip(rng.integers(100, 110, 40), rng.choice([5, 50], 40))]
    batches = cl._batches(episodes, dim=1280, batch_bytes=1 << 40, kernel=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))
    assert len(batches) == 2 and all(len({episodes[i].ways for i in b}) == 1 for b in batches)

    def padded_work(parts):
        return sum(len(b) * max(len(episodes[i].support) for i in b) ** 2 * max(episodes[i].ways for i in b)
                   for b in parts)

    by_ways = [np.array([i for i, e in enumerate(episodes) if e.ways == w]) for w in (5, 50)]
    assert padded_work(batches) == padded_work(by_ways) < 0.7 * padded_work([np.arange(40)])
    # Episodes alike in ways stay in one batch; ncc batches are never cut by ways.
    alike = [episode(100, 20)] * 10
    assert len(cl._batches(alike, 1280, 1 << 40, kernel=True)) == 1
    assert len(cl._batches(episodes, 1280, 1 << 40, kernel=False)) == 1
