"""``digits``: scikit-learn's bundled handwritten digits, a real dataset that needs no download."""

from __future__ import annotations

import numpy as np

from vtbench.data.imageset import ArrayImageSet
from vtbench.data.registry import DatasetInfo, DatasetRequest, register_dataset

DIGITS = DatasetInfo(
    name="digits",
    summary="scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images, 10 classes (offline demo)",
    layout="nothing on disk: bundled with scikit-learn; train/test is a stratified 50/50 split with seed 0",
    splits=("train", "test"),
    train_split="train", val_split=None, test_split="test",
    paper_train_splits=("train",),
    needs_root=False,
)
SPLIT_SEED = 0


@register_dataset(DIGITS)
def load_digits(req: DatasetRequest) -> ArrayImageSet:
    """Half of the digits per class in each split (898 train, 899 test), as RGB with 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.5, stratify=digits.target, random_state=SPLIT_SEED)
    rows = np.sort(train if req.split == "train" else test)
    pixels = np.round(digits.images[rows] * (255 / 16)).astype(np.uint8)
    return ArrayImageSet(req.spec, req.split, [str(d) for d in range(10)], digits.target[rows],
                         [f"{i:04d}" for i in rows], pixels)
