"""Real features: tf_efficientnet_lite0 with ImageNet weights on the shared DTD (see conftest.lite0_cache_dir)."""

from __future__ import annotations

import numpy as np

from vtbench.cache import find_cache, open_cache
from vtbench.extract import extract
from vtbench.cache import verify_cache


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
    distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distances.argmin(1)] == test_y).mean())


def test_lite0_dtd_prelogits_nearest_centroid_far_above_chance(lite0_cache_dir):
    train = open_cache(find_cache("tf_efficientnet_lite0", "dtd", "train", lite0_cache_dir))
    test = open_cache(find_cache("tf_efficientnet_lite0", "dtd", "test", lite0_cache_dir))
    assert (len(train), len(test)) == (130, 140) and len(train.class_names) == 10
    assert train.meta["weights_sha256"] == test.meta["weights_sha256"]
    acc = nearest_centroid_accuracy(train.features("prelogits"), train.labels, test.features("prelogits"), test.labels)
    assert acc > 0.6, acc  # chance is 0.1
    # Early stages are far weaker than the pre-logit feature: the per-stage taps are distinct features.
    early = nearest_centroid_accuracy(train.features("stage[0]"), train.labels, test.features("stage[0]"), test.labels)
    assert early < acc
    for cache in (train, test):
        assert verify_cache(cache.path) == []


def test_second_identical_extract_is_served_from_cache(lite0_cache_dir, lite0_weights, shared_data):
    (report,) = extract("tf_efficientnet_lite0", "dtd", "val", shared_data / "dtd", weights=str(lite0_weights),
                        cache_dir=lite0_cache_dir, progress=False)
    assert report.reused and report.n == 130
