"""Episode files: save the episodes of a run as image ids, and replay them on any model's caches.

Format (``vtbench-episodes/1``, JSON)::

    {
      "format": "vtbench-episodes/1",
      "dataset": "dtd:1",                  # canonical dataset spec
      "splits": ["train", "val", "test"],  # the extracted splits pooled into the episodes' images
      "classes": {"subset": "test", "derivation": "...", ...},   # the class split
      "episode_sets": [
        {
          "protocol": "fewshot-md",
          "sampler": {"name": "md", "min_ways": 5, ...},   # or {"name": "fixed", "ways": 5, "shots": 5, "queries": 15}
          "seed": 0,
          "episodes": [
            {"classes": ["banded", "bubbly", ...],          # class names, one per way
             "support": [["<image id>", ...], ...],         # support image ids, one list per class
             "query":   [["<image id>", ...], ...]}         # query image ids, one list per class
          ]
        }
      ]
    }

One file holds one set per protocol of a run (``--shots 1 5`` gives two).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtbench.errors import VTError
from vtbench.fewshot.samplers import Episode, Sampler, make_episode, sampler_from_params
from vtbench.paths import atomic_write_bytes

FORMAT = "vtbench-episodes/1"


@dataclass
class EpisodeSet:
    """The episodes of one protocol, with the sampler and seed that drew them."""

    sampler: Sampler
    seed: int
    episodes: list[Episode]


def save_episodes(
    path: str | os.PathLike,
    sets: list[EpisodeSet],
    *,
    dataset: str,
    splits: list[str],
    classes: dict,
    image_ids: list[str],
    class_names: list[str],
) -> Path:
    """Write ``sets`` as image ids (rows index ``image_ids``; episode classes index ``class_names``)."""

    def grouped(rows, labels, ways):
        return [[image_ids[r] for r in rows[labels == j]] for j in range(ways)]

    doc = {
        "format": FORMAT,
        "dataset": dataset,
        "splits": list(splits),
        "classes": classes,
        "episode_sets": [
            {
                "protocol": s.sampler.protocol,
                "sampler": s.sampler.params(),
                "seed": s.seed,
                "episodes": [
                    {
                        "classes": [class_names[c] for c in ep.classes],
                        "support": grouped(ep.support, ep.support_labels, ep.ways),
                        "query": grouped(ep.query, ep.query_labels, ep.ways),
                    }
                    for ep in s.episodes
                ],
            }
            for s in sets
        ],
    }
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def read_episodes(path: str | os.PathLike) -> tuple[dict, str]:
    """The parsed episodes file and the sha256 of its bytes; VTError when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VTError(f"cannot read episodes file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise VTError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise VTError(f"{path} is not a vtbench episodes file (expected format '{FORMAT}')")
    return doc, hashlib.sha256(data).hexdigest()


def episodes_from_ids(doc: dict, image_ids: list[str], labels: np.ndarray, class_names: list[str]) -> list[EpisodeSet]:
    """Turn an episodes file back into pool rows; VTError when an image id or class is not in the pool."""
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    label_of = {name: i for i, name in enumerate(class_names)}
    try:
        return [
            EpisodeSet(
                sampler_from_params(s["sampler"]),
                int(s["seed"]),
                [_episode_from_ids(ep, row_of, label_of, labels) for ep in s["episodes"]],
            )
            for s in doc["episode_sets"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise VTError(f"malformed episodes file ({type(exc).__name__}: {exc})") from None


def _episode_from_ids(ep: dict, row_of: dict[str, int], label_of: dict[str, int], labels: np.ndarray) -> Episode:
    classes, support, query = [], [], []
    for name, support_ids, query_ids in zip(ep["classes"], ep["support"], ep["query"], strict=True):
        if name not in label_of:
            raise VTError(f"episodes file: class '{name}' is not in the cached dataset")
        c = label_of[name]
        rows = _rows(support_ids, row_of), _rows(query_ids, row_of)
        if any(np.any(labels[r] != c) for r in rows):
            raise VTError(f"episodes file: images listed under class '{name}' have another label in the caches")
        classes.append(c)
        support.append(rows[0])
        query.append(rows[1])
    return make_episode(classes, support, query)

def _rows(ids: list[str], row_of: dict[str, int]) -> np.ndarray:
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise VTError(
            f"episodes file: {len(missing)} image(s) are not in the caches, e.g. '{missing[0]}'; "
            "replay needs caches of the same dataset and splits"
        )
    return np.array([row_of[i] for i in ids], dtype=np.int64)

