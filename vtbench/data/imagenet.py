"""ImageNet-1k class order (timm's): what maps a dataset's classes onto a model's own classifier head."""

from __future__ import annotations

import numpy as np

from vtbench.errors import VTError


def imagenet_synsets() -> list[str]:
    """The 1000 WordNet synset ids in the order of timm's ImageNet-1k heads (n01440764 first)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_class_index(class_names: list[str]) -> np.ndarray:
    """For each class of a dataset named by its synset id (an ImageNet val ``imagefolder`` with synset folders),
    its index in timm's ImageNet-1k head; VTError naming the classes that are not ImageNet synsets."""
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    unknown = [name for name in class_names if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise VTError(f"{len(unknown)} of {len(class_names)} classes are not ImageNet-1k synset ids ({shown}); the "
                      "model's own head scores datasets whose class folders are synsets, e.g. ImageNet val as "
                      "imagefolder:DIR with DIR/val/n01440764/...")
    return np.array([index[name] for name in class_names], dtype=np.int64)
