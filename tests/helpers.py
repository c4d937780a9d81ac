"""Small builders shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_imagefolder(root: Path, classes=3, per_class=5, splits=("train", "test"), size=(40, 30), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (rng.random((size[1], size[0], 3)) * 255 * (c + 1) / classes).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"img{i:03d}.png")
    return root
