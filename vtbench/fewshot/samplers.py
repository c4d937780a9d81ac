"""Episode samplers: Meta-Dataset's variable-way variable-shot sampler and fixed N-way K-shot.

A sampler draws one :class:`Episode` at a time from a numpy ``Generator``, given
the row indices of every eligible class, so a seed fixes every episode of a run.
Rows are positions in the feature pool that the runner builds from the caches;
episodes are saved and replayed as image ids (see :mod:`vtbench.fewshot.episodes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from vtbench.errors import VTError


@dataclass(frozen=True)
class Episode:
    """One episode: rows of the pool and their episode-local labels (0..ways-1).

    ``classes[j]`` is the pool label of local class ``j``; support and query are
    disjoint and grouped by class (all rows of local class 0 first, then 1, ...).
    """

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray

    @property
    def ways(self) -> int:
        return len(self.classes)


def make_episode(classes, support_parts, query_parts) -> Episode:
    """An Episode from per-class row arrays (local class j = position j)."""

    def stack(parts):
        rows = np.concatenate(parts).astype(np.int64)
        labels = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        return rows, labels

    support, support_labels = stack(support_parts)
    query, query_labels = stack(query_parts)
    return Episode(np.asarray(classes, dtype=np.int64), support, support_labels, query, query_labels)


@dataclass(frozen=True)
class MetaDatasetSampler:
    """Meta-Dataset's variable-way variable-shot episodes (Triantafillou et al. 2020, its sampling.py).

    Per episode: ways ~ U{min_ways..min(max_ways, #classes)}, classes uniform without
    replacement; q = min(max_query, floor(min_c n_c / 2)) queries for every class;
    support size S = min(max_support, sum_c floor(beta * min(max_support_per_class, n_c - q) + 1)),
    beta ~ U(0, 1), so S >= ways; shots k_c = min(floor(w_c / sum(w) * (S - ways)) + 1, n_c - q)
    with w_c = n_c * exp(u_c), u_c ~ U(log 0.5, log 2).
    """

    min_ways: int = 5
    max_ways: int = 50
    max_query: int = 10
    max_support: int = 500
    max_support_per_class: int = 100

    name = "md"
    min_images_per_class = 2  # one query and one shot

    @property
    def min_classes(self) -> int:
        return self.min_ways

    @property
    def protocol(self) -> str:
        return "fewshot-md"

    def params(self) -> dict:
        return {"name": self.name, **asdict(self)}

    def sample(self, rng: np.random.Generator, class_rows: list[np.ndarray]) -> Episode:
        ways = int(rng.integers(self.min_ways, min(self.max_ways, len(class_rows)) + 1))
        chosen = rng.choice(len(class_rows), size=ways, replace=False)
        sizes = np.array([len(class_rows[c]) for c in chosen])
        num_query = min(self.max_query, int(sizes.min()) // 2)
        remaining = sizes - num_query
        beta = rng.uniform()
        # Meta-Dataset writes ceil(beta * x) as floor(beta * x + 1): every class adds at least one.
        support_size = min(
            self.max_support,
            int(np.floor(beta * np.minimum(self.max_support_per_class, remaining) + 1).sum()),
        )
        weights = sizes * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=ways))
        shots = np.minimum(np.floor(weights / weights.sum() * (support_size - ways)).astype(np.int64) + 1, remaining)
        support, query = [], []
        for c, k in zip(chosen, shots):
            rows = rng.permutation(class_rows[c])
            query.append(rows[:num_query])
            support.append(rows[num_query : num_query + k])
        return make_episode(chosen, support, query)


@dataclass(frozen=True)
class FixedSampler:
    """N-way K-shot episodes with Q queries per class; classes uniform without replacement."""

    ways: int = 5
    shots: int = 1
    queries: int = 15

    name = "fixed"

    def __post_init__(self):
        # One way would be a classification without a choice: every query right.
        for field, least in (("ways", 2), ("shots", 1), ("queries", 1)):
            if getattr(self, field) < least:
                raise VTError(f"fixed sampler: --{field} must be at least {least}, got {getattr(self, field)}")

    @property
    def min_images_per_class(self) -> int:
        return self.shots + self.queries

    @property
    def min_classes(self) -> int:
        return self.ways

    @property
    def protocol(self) -> str:
        return f"fewshot-{self.ways}w{self.shots}s"

    def params(self) -> dict:
        return {"name": self.name, **asdict(self)}

    def sample(self, rng: np.random.Generator, class_rows: list[np.ndarray]) -> Episode:
        chosen = rng.choice(len(class_rows), size=self.ways, replace=False)
        support, query = [], []
        for c in chosen:
            rows = rng.permutation(class_rows[c])
            support.append(rows[: self.shots])
            query.append(rows[self.shots : self.shots + self.queries])
        return make_episode(chosen, support, query)


Sampler = MetaDatasetSampler | FixedSampler


def sampler_from_params(params: dict) -> Sampler:
    """Rebuild a sampler from :meth:`params` (as stored in an episodes file or a result record)."""
    params = dict(params)
    name = params.pop("name", None)
    if name == "md":
        return MetaDatasetSampler(**params)
    if name == "fixed":
        return FixedSampler(**params)
    raise VTError(f"unknown episode sampler '{name}'; use 'md' or 'fixed'")


def eligible_classes(labels: np.ndarray, classes, sampler: Sampler) -> tuple[list[int], list[int]]:
    """Split ``classes`` (pool labels) into those with enough images for ``sampler`` and those without."""
    counts = np.bincount(labels, minlength=max(classes, default=-1) + 1)
    keep = [int(c) for c in classes if counts[c] >= sampler.min_images_per_class]
    dropped = [int(c) for c in classes if counts[c] < sampler.min_images_per_class]
    return keep, dropped


def sample_episodes(
    labels: np.ndarray, classes, sampler: Sampler, num_episodes: int, seed: int
) -> list[Episode]:
    """``num_episodes`` episodes over the rows whose label is in ``classes``; the seed fixes them all.

    Episode classes are indices into ``classes`` mapped back to pool labels.
    Raises VTError when fewer than ``sampler.min_classes`` classes are given.
    """
    classes = [int(c) for c in classes]
    if num_episodes < 1:
        raise VTError(f"--episodes must be at least 1, got {num_episodes}")
    if len(classes) < sampler.min_classes:
        raise VTError(
            f"the '{sampler.name}' sampler needs at least {sampler.min_classes} classes with "
            f">= {sampler.min_images_per_class} images each; only {len(classes)} qualify"
        )
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], [classes, np.asarray(classes) + 1])
    class_rows = [order[lo:hi] for lo, hi in zip(*bounds)]
    rng = np.random.default_rng(seed)
    pool_labels = np.asarray(classes, dtype=np.int64)
    episodes = []
    for _ in range(num_episodes):
        ep = sampler.sample(rng, class_rows)
        episodes.append(Episode(pool_labels[ep.classes], ep.support, ep.support_labels, ep.query, ep.query_labels))
    return episodes
