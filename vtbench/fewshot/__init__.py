"""Meta-Dataset-style few-shot episodes on cached features.

- :mod:`~vtbench.fewshot.samplers`: the ``md`` (variable-way variable-shot) and ``fixed`` (N-way K-shot) samplers
- :mod:`~vtbench.fewshot.splits`: train/val/test class splits per dataset
- :mod:`~vtbench.fewshot.episodes`: saving and replaying episodes as image ids
- :mod:`~vtbench.fewshot.classifiers`: batched per-episode ``lr`` and ``ncc``
- :func:`run_fewshot`: all of it on a model's caches, results into the store
"""

from vtbench.fewshot.classifiers import episode_accuracies
from vtbench.fewshot.episodes import EpisodeSet, episodes_from_ids, read_episodes, save_episodes
from vtbench.fewshot.run import confidence_interval, run_fewshot
from vtbench.fewshot.samplers import Episode, FixedSampler, MetaDatasetSampler, sample_episodes
from vtbench.fewshot.splits import class_split

__all__ = [
    "Episode",
    "EpisodeSet",
    "FixedSampler",
    "MetaDatasetSampler",
    "class_split",
    "confidence_interval",
    "episode_accuracies",
    "episodes_from_ids",
    "read_episodes",
    "run_fewshot",
    "sample_episodes",
    "save_episodes",
]
