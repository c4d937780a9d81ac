"""`ImageSet`: one split of one dataset, as labels, ids and a way to read each image."""

from __future__ import annotations

import hashlib
import io
import os
from functools import cached_property

import numpy as np
from PIL import Image

from vtbench.errors import VTError


class ImageSet:
    """One split of one dataset: ``labels[i]`` and ``image_ids[i]`` describe image ``load(i)``.

    The base class reads files: ``image_ids`` are paths relative to ``root``.
    It holds only plain data (no open files), so it pickles cheaply into
    DataLoader worker processes.
    """

    def __init__(
        self,
        name: str,
        split: str,
        class_names: list[str],
        labels,
        image_ids: list[str],
        root: str | os.PathLike | None,
    ):
        self.name = name
        self.split = split
        self.class_names = list(class_names)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.image_ids = list(image_ids)
        self.root = None if root is None else str(root)
        if len(self.labels) != len(self.image_ids):
            raise ValueError(f"{len(self.labels)} labels for {len(self.image_ids)} images")
        # The checks below catch broken annotation files, a user problem.
        if len(set(self.image_ids)) != len(self.image_ids):
            raise VTError(f"{name}/{split}: the annotations list some images more than once")
        if len(self.labels) and not (0 <= self.labels.min() and self.labels.max() < len(self.class_names)):
            raise VTError(f"{name}/{split}: labels outside 0..{len(self.class_names) - 1} in the annotations")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}/{self.split}, {len(self)} images, "
                f"{len(self.class_names)} classes, root={self.root})")

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises ``OSError`` naming the image if it cannot be read or decoded."""
        try:
            return self._read(i)
        except Exception as exc:  # PIL raises many types for broken files; report them as one
            raise OSError(f"cannot read {self.image_ids[i]}: {type(exc).__name__}: {exc}") from exc

    def _read(self, i: int) -> Image.Image:
        return decode_rgb(os.path.join(self.root or "", self.image_ids[i]))

    def _item_sizes(self) -> list[int]:
        """Byte size of every item (-1 where a file is missing): part of the fingerprint."""
        sizes = []
        for image_id in self.image_ids:
            try:
                sizes.append(os.stat(os.path.join(self.root or "", image_id)).st_size)
            except OSError:
                sizes.append(-1)
        return sizes

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over (image_id, byte size, label) of every item and the class names."""
        h = hashlib.sha256()
        for image_id, size, label in zip(self.image_ids, self._item_sizes(), self.labels.tolist()):
            h.update(f"{image_id}\t{size}\t{label}\n".encode())
        h.update("\n".join(self.class_names).encode())
        return h.hexdigest()


def decode_rgb(source) -> Image.Image:
    """The image in ``source`` (a path or file object), fully decoded, as RGB; the file is closed on return."""
    with Image.open(source) as img:
        img.load()  # decodes the whole file, so truncated data fails here
        # An RGB image is returned as is: convert() would copy it (0.1-0.2 ms of a 2.4 ms decode on DTD).
        return img if img.mode == "RGB" else img.convert("RGB")


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``."""

    def __init__(self, name, split, class_names, labels, image_ids, pixels: np.ndarray):
        super().__init__(name, split, class_names, labels, image_ids, root=None)
        self.pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if len(self.pixels) != len(self.image_ids):
            raise ValueError(f"{len(self.pixels)} images for {len(self.image_ids)} ids")

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i]).convert("RGB")

    def _item_sizes(self) -> list[int]:
        # Every item has the same byte size, so the pixels themselves stand in for it.
        return [int.from_bytes(hashlib.sha256(p.tobytes()).digest()[:8], "big") for p in self.pixels]


class HFImageSet(ImageSet):
    """One split of a Hugging Face ``datasets.Dataset``; images are decoded here, not by ``datasets``.

    ``dataset`` must have no indices mapping (``flatten_indices()`` first);
    it pickles by reference to its memory-mapped Arrow files.
    """

    def __init__(self, name, split, class_names, labels, image_ids, dataset, image_column: str, root=None):
        super().__init__(name, split, class_names, labels, image_ids, root=root)
        from datasets import Image as ImageFeature

        self.dataset = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
        self.image_column = image_column

    def _read(self, i: int) -> Image.Image:
        item = self.dataset[i][self.image_column]
        return decode_rgb(io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"])

    def _item_sizes(self) -> list[int]:
        import pyarrow.compute as pc

        sizes = []
        # Reads only the Arrow offsets, never the image bytes.
        for chunk in self.dataset.data.column(self.image_column).chunks:
            sizes.extend(pc.fill_null(pc.binary_length(chunk.field("bytes")), -1).to_pylist())
        return sizes
