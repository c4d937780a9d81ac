"""Class splits for few-shot evaluation: which classes episodes draw from.

Meta-Dataset divides each source's classes into train/valid/test classes and
evaluates on the test classes only. Its class lists are not available offline,
so vtbench derives them with the same *proportions* by a documented seeded
permutation (see :func:`class_split`); the record of every result says so.
Places365 and iNaturalist 2019 are not Meta-Dataset sources; vtbench gives
them a 70/15/15 split of its own, the proportions Meta-Dataset uses for Aircraft and CUB.
"""

from __future__ import annotations

import numpy as np

from vtbench.errors import VTError

# (train, valid, test) class counts out of each dataset's full class list.
CLASS_SPLITS: dict[str, tuple[int, int, int]] = {
    "aircraft": (70, 15, 15),
    "cub": (140, 30, 30),
    "dtd": (33, 7, 7),
    "fungi": (994, 200, 200),
    "gtsrb": (0, 0, 43),
    # Not Meta-Dataset sources: vtbench's own proportions.
    "places365": (70, 15, 15),
    "inat2019": (70, 15, 15),
}
SOURCES = {name: "meta-dataset proportions" for name in ("aircraft", "cub", "dtd", "fungi", "gtsrb")} | {
    "places365": "vtbench proportions",
    "inat2019": "vtbench proportions",
}
CLASS_SPLIT_SEED = 0
SUBSETS = ("train", "val", "test", "all")


def has_class_split(dataset_name: str) -> bool:
    """Whether ``dataset_name`` has a defined train/val/test class split (else only ``all``)."""
    return dataset_name in CLASS_SPLITS


def default_subset(dataset_name: str) -> str:
    """``test`` where a class split is defined, else ``all``."""
    return "test" if has_class_split(dataset_name) else "all"


def split_sizes(num_classes: int, proportions: tuple[int, int, int]) -> tuple[int, int, int]:
    """Class counts for a dataset with ``num_classes`` classes, scaled from ``proportions``.

    With a dataset's full class list this gives Meta-Dataset's counts exactly;
    a subset of the classes (a small test copy, say) keeps the proportions,
    rounding half up; train takes what is left.
    """
    total = sum(proportions)
    n_val = int(np.floor(num_classes * proportions[1] / total + 0.5))
    n_test = int(np.floor(num_classes * proportions[2] / total + 0.5))
    return num_classes - n_val - n_test, n_val, n_test


def class_split(dataset_name: str, class_names: list[str], subset: str) -> tuple[list[str], dict]:
    """The class names of ``subset`` (train, val, test or all) and a description of how they were derived.

    Derivation: sort the class names; permute them with
    ``numpy.random.default_rng(CLASS_SPLIT_SEED).permutation``; the first
    ``n_train`` are train classes, the next ``n_val`` val, the last ``n_test`` test.
    """
    if subset not in SUBSETS:
        raise VTError(f"unknown --classes '{subset}'; use one of {', '.join(SUBSETS)}")
    names = sorted(set(class_names))
    if subset == "all":
        return names, {"subset": "all", "derivation": "every class of the dataset", "num_classes": len(names)}
    if not has_class_split(dataset_name):
        raise VTError(
            f"dataset '{dataset_name}' has no defined class split; use --classes all "
            f"(splits exist for {', '.join(sorted(CLASS_SPLITS))})"
        )
    proportions = CLASS_SPLITS[dataset_name]
    n_train, n_val, n_test = split_sizes(len(names), proportions)
    perm = np.random.default_rng(CLASS_SPLIT_SEED).permutation(len(names))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(names))}
    lo, hi = bounds[subset]
    chosen = sorted(names[i] for i in perm[lo:hi])
    info = {
        "subset": subset,
        "derivation": (
            f"{SOURCES[dataset_name]} {'/'.join(map(str, proportions))} (train/val/test) scaled to "
            f"{len(names)} classes -> {n_train}/{n_val}/{n_test}; sorted class names permuted with "
            f"numpy default_rng({CLASS_SPLIT_SEED}); train first, then val, then test. Not Meta-Dataset's own class lists."
        ),
        "proportions": list(proportions),
        "sizes": [n_train, n_val, n_test],
        "seed": CLASS_SPLIT_SEED,
        "num_classes": len(chosen),
    }
    return chosen, info
