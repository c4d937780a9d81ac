"""Episode samplers and class splits: invariants over thousands of episodes on synthetic label arrays."""

from __future__ import annotations

import numpy as np
import pytest

from vtbench.errors import VTError
from vtbench.fewshot.samplers import (
    FixedSampler,
    MetaDatasetSampler,
    eligible_classes,
    sample_episodes,
    sampler_from_params,
)
from vtbench.fewshot.splits import CLASS_SPLITS, class_split, split_sizes


def _labels(sizes) -> np.ndarray:
    """Shuffled labels with ``sizes[c]`` images of class c (shuffled so rows of a class are not contiguous)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(123).permutation(labels)


def _check_md_episode(ep, labels, sizes, num_classes):
    sampler = MetaDatasetSampler()
    assert 5 <= ep.ways <= min(50, num_classes)
    assert len(set(ep.classes.tolist())) == ep.ways
    n = sizes[ep.classes]
    q = min(10, int(n.min()) // 2)
    queries = np.bincount(ep.query_labels, minlength=ep.ways)
    assert (queries == q).all(), "every class has the same number of queries, by the q rule"
    shots = np.bincount(ep.support_labels, minlength=ep.ways)
    assert (shots >= 1).all() and (shots <= n - q).all()
    assert ep.ways <= len(ep.support) <= sampler.max_support
    # sum_c k_c <= S <= sum_c floor(beta * min(100, n_c - q) + 1) < sum_c min(100, n_c - q) + ways
    assert len(ep.support) <= np.minimum(100, n - q).sum() + ep.ways
    assert not set(ep.support.tolist()) & set(ep.query.tolist()), "support and query are disjoint"
    assert len(set(ep.support.tolist())) == len(ep.support) and len(set(ep.query.tolist())) == len(ep.query)
    assert (labels[ep.support] == ep.classes[ep.support_labels]).all()
    assert (labels[ep.query] == ep.classes[ep.query_labels]).all()


def test_md_invariants_over_thousands_of_episodes():
    rng = np.random.default_rng(0)
    # Small classes (2, 3 images) exercise the query rule; large ones the 100/500 caps.
    sizes = np.concatenate([[2, 3, 5], rng.integers(4, 400, size=77)])
    labels = _labels(sizes)
    episodes = sample_episodes(labels, range(len(sizes)), MetaDatasetSampler(), 3000, seed=0)
    for ep in episodes:
        _check_md_episode(ep, labels, sizes, len(sizes))
    ways = np.array([ep.ways for ep in episodes])
    assert ways.min() == 5 and ways.max() == 50, "ways cover [5, min(50, #classes)]"
    assert abs(ways.mean() - 27.5) < 1.0, "ways are uniform on [5, 50]"
    support = np.array([len(ep.support) for ep in episodes])
    # The floors in k_c leave the support up to ways - 1 short of S = 500.
    assert support.max() > 480, "big episodes reach the 500 cap"
    assert support.min() < 50, "beta near 0 gives small support sets"
    queries = np.array([len(ep.query) // ep.ways for ep in episodes])
    assert set(queries.tolist()) >= {1, 10}


def test_md_with_few_classes_caps_ways_at_the_class_count():
    sizes = np.full(7, 30)
    labels = _labels(sizes)
    episodes = sample_episodes(labels, range(7), MetaDatasetSampler(), 500, seed=3)
    assert {ep.ways for ep in episodes} == {5, 6, 7}
    for ep in episodes:
        _check_md_episode(ep, labels, sizes, 7)
        assert len(ep.query) == ep.ways * 10


def test_md_respects_the_given_classes():
    labels = _labels(np.full(40, 20))
    allowed = [3, 5, 8, 13, 21, 34]
    for ep in sample_episodes(labels, allowed, MetaDatasetSampler(), 200, seed=1):
        assert set(ep.classes.tolist()) <= set(allowed)


def test_fixed_sampler_shapes():
    labels = _labels(np.full(30, 25))
    for ways, shots, queries in [(5, 1, 15), (5, 5, 15), (10, 3, 4)]:
        episodes = sample_episodes(labels, range(30), FixedSampler(ways, shots, queries), 300, seed=2)
        for ep in episodes:
            assert ep.ways == ways and len(set(ep.classes.tolist())) == ways
            assert (np.bincount(ep.support_labels, minlength=ways) == shots).all()
            assert (np.bincount(ep.query_labels, minlength=ways) == queries).all()
            assert not set(ep.support.tolist()) & set(ep.query.tolist())
            assert (labels[ep.support] == ep.classes[ep.support_labels]).all()
            assert (labels[ep.query] == ep.classes[ep.query_labels]).all()


def test_same_seed_same_episodes_and_other_seed_other_episodes():
    labels = _labels(np.random.default_rng(5).integers(2, 60, size=25))
    for sampler in (MetaDatasetSampler(), FixedSampler(5, 1, 1)):
        a = sample_episodes(labels, range(25), sampler, 50, seed=7)
        b = sample_episodes(labels, range(25), sampler, 50, seed=7)
        c = sample_episodes(labels, range(25), sampler, 50, seed=8)
        for x, y in zip(a, b):
            for field in ("classes", "support", "support_labels", "query", "query_labels"):
                assert np.array_equal(getattr(x, field), getattr(y, field))
        assert any(not np.array_equal(x.support, z.support) for x, z in zip(a, c))


def test_too_few_classes_or_images_is_a_clear_error():
    labels = _labels(np.full(4, 50))
    with pytest.raises(VTError, match="at least 5 classes"):
        sample_episodes(labels, range(4), MetaDatasetSampler(), 10, seed=0)
    labels = _labels([30, 30, 30, 30, 30, 10, 10])
    usable, dropped = eligible_classes(labels, range(7), FixedSampler(5, 5, 15))
    assert usable == [0, 1, 2, 3, 4] and dropped == [5, 6]
    usable, _ = eligible_classes(labels, range(7), FixedSampler(5, 5, 26))
    with pytest.raises(VTError, match="needs at least 5 classes with >= 31 images"):
        sample_episodes(labels, usable, FixedSampler(5, 5, 26), 10, seed=0)
    with pytest.raises(VTError, match="--shots must be at least 1"):
        FixedSampler(5, 0, 15)
    with pytest.raises(VTError, match="--ways must be at least 2, got 1"):  # a 1-way episode is always right
        FixedSampler(1, 5, 15)


def test_sampler_params_round_trip():
    for sampler in (MetaDatasetSampler(), FixedSampler(10, 5, 3)):
        assert sampler_from_params(sampler.params()) == sampler
    assert FixedSampler(5, 1, 15).protocol == "fewshot-5w1s"
    assert MetaDatasetSampler().protocol == "fewshot-md"


def test_class_split_sizes_and_determinism():
    # With a dataset's full class list the split sizes are Meta-Dataset's.
    assert split_sizes(100, CLASS_SPLITS["aircraft"]) == (70, 15, 15)
    assert split_sizes(200, CLASS_SPLITS["cub"]) == (140, 30, 30)
    assert split_sizes(47, CLASS_SPLITS["dtd"]) == (33, 7, 7)
    assert split_sizes(1394, CLASS_SPLITS["fungi"]) == (994, 200, 200)
    assert split_sizes(43, CLASS_SPLITS["gtsrb"]) == (0, 0, 43)
    names = [f"class{i:03d}" for i in range(100)]
    test, info = class_split("aircraft", names[::-1], "test")
    train, _ = class_split("aircraft", names, "train")
    val, _ = class_split("aircraft", names, "val")
    assert len(test) == 15 and len(val) == 15 and len(train) == 70
    assert set(test) | set(val) | set(train) == set(names)
    assert not set(test) & (set(val) | set(train))
    assert class_split("aircraft", names, "test")[0] == test, "input order does not matter"
    assert info["sizes"] == [70, 15, 15] and "Not Meta-Dataset's own class lists" in info["derivation"]
    gtsrb = [f"{i:05d}" for i in range(43)]
    assert class_split("gtsrb", gtsrb, "test")[0] == gtsrb
    assert class_split("imagefolder", names, "all")[0] == names
    with pytest.raises(VTError, match="no defined class split"):
        class_split("imagefolder", names, "test")
    with pytest.raises(VTError, match="unknown --classes"):
        class_split("aircraft", names, "everything")
