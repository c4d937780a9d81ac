"""Evaluation splits on cached features: token specs read from one or more caches, a held-out validation split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from vtbench.errors import VTError
from vtbench.tokens import TokenSpec

VAL_FRACTION = 0.2


@dataclass
class Split:
    """One evaluation split: the rows of one or more caches, and token features read from them on demand."""

    names: list[str]  # dataset split names, e.g. ["train", "val"]
    caches: list  # FeatureCache per name
    rows: np.ndarray | None = None  # a subset of the concatenated rows (a held-out part), or all
    description: str | list[str] = ""  # what the record calls this split
    _blocks: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> np.ndarray:
        labels = np.concatenate([c.labels for c in self.caches])
        return labels if self.rows is None else labels[self.rows]

    def block(self, kind: str, block: int) -> np.ndarray:
        """One (kind, block) over the split's rows, read once and kept (specs share blocks)."""
        key = (kind, block)
        if key not in self._blocks:
            parts = [c.block(kind, block) for c in self.caches]
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self._blocks[key] = arr if self.rows is None else arr[self.rows]
        return self._blocks[key]

    def features(self, spec: TokenSpec) -> np.ndarray:
        """The spec's blocks concatenated in spec order, ``(N, D)`` float32."""
        pairs = spec.resolve(self.caches[0].kinds)
        parts = [self.block(kind, block) for kind, block in pairs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def width(self, spec: TokenSpec) -> int:
        """The spec's feature width."""
        return feature_width(self.caches[0], spec)

    def chunks(self, spec: TokenSpec, rows: int | None = None):
        """The spec's features in row order, ``rows`` rows at a time read from the caches (float32), or with
        ``rows=None`` all at once (read once and kept, as :meth:`features`)."""
        if rows is None:
            yield self.features(spec)
            return
        pairs = spec.resolve(self.caches[0].kinds)
        sizes = [len(c) for c in self.caches]
        starts = np.cumsum([0] + sizes)
        selected = np.arange(starts[-1]) if self.rows is None else self.rows
        for lo in range(0, len(selected), rows):
            wanted = selected[lo : lo + rows]
            owner = np.searchsorted(starts, wanted, side="right") - 1
            parts = []
            for run in np.split(np.arange(len(wanted)), np.flatnonzero(np.diff(owner)) + 1):
                cache, local = self.caches[owner[run[0]]], wanted[run] - starts[owner[run[0]]]
                blocks = [cache.block_rows(kind, block, local, dtype=np.float32) for kind, block in pairs]
                parts.append(blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1))
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)

    def digest(self, spec: TokenSpec, rows: int | None = None) -> bytes:
        """A hash of the spec's features (the same however they are chunked)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((len(self), self.width(spec))).encode())
        for chunk in self.chunks(spec, rows):
            digest.update(np.ascontiguousarray(chunk, dtype=np.float32).data)
        return digest.digest()

    def subset(self, rows: np.ndarray, description: str) -> "Split":
        """The given rows of this split as a split of its own (sharing nothing that was read)."""
        base = np.arange(sum(len(c) for c in self.caches)) if self.rows is None else self.rows
        return Split(self.names, self.caches, base[rows], description)

    def cache_refs(self) -> list[dict]:
        """What a record says of each cache it read: key, path, split, and which images (root, fingerprint,
        rows, skipped images)."""
        return [c.record_ref(name) for name, c in zip(self.names, self.caches)]

    def __len__(self) -> int:
        return len(self.labels)


def feature_width(cache, spec: TokenSpec) -> int:
    """The width of a spec's features in a cache (the sum of its blocks' widths)."""
    return sum(cache.meta["dims"][kind][block] for kind, block in spec.resolve(cache.kinds))


def stratified_holdout(labels: np.ndarray, seed: int, fraction: float = VAL_FRACTION,
                       class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices into (train, val): ``round(fraction * n_c)`` (at least 1) per class."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if (counts < 2).any():
        few = [class_names[c] if class_names else str(c) for c in classes[counts < 2]]
        shown = ", ".join(few[:5]) + (", ..." if len(few) > 5 else "")
        raise VTError(
            f"{len(few)} class{'es have' if len(few) > 1 else ' has'} fewer than 2 training images ({shown}), too "
            f"few to hold out a {fraction:.0%} validation split; use a dataset with an official validation split "
            f"or more images"
        )
    rng = np.random.default_rng(seed)
    val = []
    for cls, count in zip(classes, counts):
        members = np.flatnonzero(labels == cls)
        take = min(count - 1, max(1, int(round(fraction * count))))
        val.append(rng.permutation(members)[:take])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val
