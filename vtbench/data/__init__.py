"""The dataset registry: every dataset split as an :class:`ImageSet` of (image, label, image_id).

Datasets are named by a spec ``NAME[:ARG]`` (``dtd``, ``dtd:2``, ``places365:large``,
``imagefolder:/data/x``, ``csv:/d/{split}.csv``, ``hf:NAME?label=COL``, ``digits``).
Files are read from ``--root`` or ``$VT_DATA/<name>``; ``docs/datasets.md`` lists the layouts.
"""

from vtbench.data.imageset import ImageSet
from vtbench.data.registry import (
    DatasetInfo,
    DatasetRequest,
    available_splits,
    canonical_spec,
    dataset_info,
    get_dataset,
    list_datasets,
    register_dataset,
    resolve_root,
)

# Importing the loaders registers them.
from vtbench.data import digits, generic, hf, official  # noqa: E402,F401

__all__ = [
    "ImageSet",
    "DatasetInfo",
    "DatasetRequest",
    "available_splits",
    "canonical_spec",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "resolve_root",
]
