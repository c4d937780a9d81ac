"""Picking caches: :func:`find_cache` for one split, :class:`CacheSet` for the splits of one evaluation.

A cache is picked by model, dataset and split, narrowed by weights, extraction settings
(:class:`~vtbench.settings.SettingsQuery`), the dataset root its images came from, and the token
kinds it must hold. Caches that would give different numbers are never picked silently: where
several match, the error names each and the options that tell them apart.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

from vtbench.cache.index import list_caches
from vtbench.cache.store import FeatureCache, open_cache
from vtbench.errors import VTError
from vtbench.settings import FeatureSettings, SettingsQuery, telling_apart


@functools.lru_cache(maxsize=256)
def _fingerprint_at(dataset: str, split: str, data_root: str) -> str | None:
    from vtbench.data import get_dataset

    try:
        return get_dataset(dataset, split, data_root).fingerprint
    except VTError:
        return None  # that root has no such split (or no such data)


def same_data(meta: dict, data_root: str | os.PathLike) -> bool:
    """Whether a cache (or a record's reference to one) holds the images of its split under ``data_root``
    today: the same data fingerprint (ids, byte sizes, labels), wherever the cache was extracted from."""
    fingerprint = _fingerprint_at(meta.get("dataset"), meta.get("split"), str(Path(data_root).expanduser().resolve()))
    return fingerprint is not None and fingerprint == meta.get("data_fingerprint")


def weights_match(weights: str | None, sha256: str, source: str) -> bool:
    """A ``--weights`` filter: a sha256 prefix or a substring of the weights source (None matches any)."""
    return not weights or str(sha256 or "").startswith(weights) or weights in str(source or "")


def _describe(meta: dict) -> str:
    """What tells caches of one model, dataset and split apart, in words (versions and file dates aside)."""
    return (f"weights {str(meta.get('weights_sha256', ''))[:12]} ({meta.get('weights_source')}), "
            + FeatureSettings.of(meta).describe())


def _describe_data(meta: dict) -> str:
    """Which images a cache holds, in words: root, rows, skipped images and data fingerprint."""
    skipped = int(meta.get("n_skipped", 0) or 0)
    return (f"data {str(meta.get('data_fingerprint', ''))[:12]} (root {meta.get('dataset_root') or 'in memory'}, "
            f"{int(meta.get('n', 0)) - skipped} images" + (f", {skipped} skipped" if skipped else "") + ")")


def _candidates(root: Path, model: str, dataset: str, split: str | None, weights, settings, data_root):
    """Complete caches of (model, dataset[, split]) that pass the weights, settings and data filters."""
    for path, meta in list_caches(root):
        if meta.get("model") != model or meta.get("dataset") != dataset:
            continue
        if split is not None and meta.get("split") != split:
            continue
        if not weights_match(weights, meta.get("weights_sha256"), meta.get("weights_source")):
            continue
        if not (settings or SettingsQuery()).matches(meta, clean_unless_given=True):
            continue
        if data_root is not None and not same_data(meta, data_root):
            continue
        yield path, meta


def find_cache(
    model: str,
    dataset: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    weights: str | None = None,
    settings: SettingsQuery | None = None,
    data_root: str | os.PathLike | None = None,
    kinds: Iterable[str] = (),
) -> Path:
    """The complete cache for (model, dataset, split), narrowed by optional filters.

    ``dataset`` is canonicalised through the dataset registry (``dtd`` -> ``dtd:1``).
    ``weights`` matches a sha256 prefix or a substring of the weights source
    (``random-init``, ``file:...``, ``hub:...``); ``settings`` the extraction settings given; ``data_root``
    keeps the caches that hold the images under that dataset root (:func:`same_data`); ``kinds`` are token
    kinds the cache must hold. Raises VTError when nothing matches (naming the ``vt extract`` command
    that would make it) or when caches of other extraction settings or other data match. Among caches of
    the same settings and data, the one with the most token kinds (then the newest) is taken.
    """
    from vtbench.data import canonical_spec, dataset_info
    from vtbench.data.registry import check_split
    from vtbench.paths import cache_dir

    root = cache_dir(root)
    dataset = canonical_spec(dataset)
    info = dataset_info(dataset)
    if not info.generic:  # a split the dataset does not have: say so, not "extract it"
        check_split(dataset, split, info.splits)
    kinds = set(kinds)
    matches, lacking = [], []
    for path, meta in _candidates(root, model, dataset, split, weights, settings, data_root):
        (matches if kinds <= set(meta.get("kinds", {})) else lacking).append((path, meta))
    if not matches:
        raise VTError(_nothing_found(model, dataset, split, root, weights, settings, data_root, kinds, lacking))
    variants = {(_describe(m), _describe_data(m)) for _, m in matches}
    if len(variants) > 1:
        raise VTError(_ambiguous(model, dataset, split, matches, variants))
    # newest first within the same number of kinds: list_caches sorts newest first, and sorted() is stable
    return sorted(matches, key=lambda pm: -len(pm[1].get("kinds", {})))[0][0]


def _extract_hint(model, dataset, split, weights, settings, data_root) -> str:
    hint = f"vt extract --model {model} --dataset {dataset} --split {split}"
    if data_root is not None:
        hint += f" --root {data_root}"
    for name, value in (settings.given() if settings is not None else {}).items():
        if name == "norm":
            hint += " --norm" if value else " --no-norm"
        elif name != "precision":
            hint += f" --{name.replace('_', '-')} {value}"
    if weights:
        hint += f" (with the weights matching '{weights}')"
    return hint


def _nothing_found(model, dataset, split, root, weights, settings, data_root, kinds, lacking) -> str:
    hint = _extract_hint(model, dataset, split, weights, settings, data_root)
    if lacking:
        have = sorted({k for _, m in lacking for k in m.get("kinds", {})})
        missing = ", ".join(f"'{k}'" for k in sorted(kinds - set(have))) or ", ".join(f"'{k}'" for k in sorted(kinds))
        return (f"no {missing} features in any cache of {model} on {dataset}/{split} under {root} (they hold: "
                f"{', '.join(have)}); where the model has them: {hint} --kinds {','.join(sorted(kinds | set(have)))}")
    wanted = f" with {settings}" if settings is not None and settings.given() else ""
    return f"no cache for {model} on {dataset}/{split}{wanted} under {root}; make it with: {hint}"


def _ambiguous(model, dataset, split, matches, variants) -> str:
    metas = [m for _, m in matches]
    apart = telling_apart([FeatureSettings.of(m) for m in metas])
    if len({m.get("weights_sha256") for m in metas}) > 1:
        apart.insert(0, "--weights")
    if len({v[1] for v in variants}) > 1:
        apart.append("--root DIR (the dataset root given to vt extract)")
    return (f"{len(variants)} different caches match {model} on {dataset}/{split}: "
            + "; ".join(f"{a}, {b}" for a, b in sorted(variants))
            + f". Narrow it with {' or '.join(apart) if apart else '--root'}, or remove the one you do not want "
            "('vt cache ls' lists them, 'vt cache rm' removes them)")


def check_compatible(caches: dict[str, FeatureCache]) -> None:
    """Raise VTError unless every cache comes from the same model and weights, and settings that agree."""
    (ref_name, ref), *rest = caches.items()
    for name, other in rest:
        for field in ("model", "model_kwargs", "weights_sha256"):
            if ref.meta.get(field) != other.meta.get(field):
                raise VTError(f"the {ref_name} and {name} caches differ in {field} ({ref.meta.get(field)!r} vs "
                              f"{other.meta.get(field)!r}); extract both with the same options")
        differ = ref.settings.disagreement(other.settings)
        if differ:
            field, a, b = differ
            raise VTError(f"the {ref_name} and {name} caches differ in {field} ({a!r} vs {b!r}); extract both "
                          "with the same options")


class CacheSet:
    """The caches of one (model, weights, settings, dataset), by split: opened once each and checked to agree.

    Used by probes, few-shot and suites alike. ``weights``, ``settings`` and ``data_root`` narrow the
    caches as :func:`find_cache` does; ``kinds`` are token kinds every cache must hold.
    """

    def __init__(self, model: str, dataset: str, *, cache_dir=None, weights: str | None = None,
                 settings: SettingsQuery | None = None, data_root=None, kinds: Iterable[str] = ()):
        from vtbench.data import canonical_spec

        self.model, self.dataset = model, canonical_spec(dataset)
        self.weights, self.settings, self.data_root = weights, settings, data_root
        self.kinds = set(kinds)
        self.cache_dir = cache_dir
        self._open: dict[str, FeatureCache] = {}

    def find(self, split: str) -> Path:
        """The path of one split's cache (VTError naming the ``vt extract`` command when missing)."""
        return find_cache(self.model, self.dataset, split, self.cache_dir, weights=self.weights,
                          settings=self.settings, data_root=self.data_root, kinds=self.kinds)

    def get(self, split: str) -> FeatureCache:
        """The cache of one split, opened once."""
        if split not in self._open:
            self._open[split] = open_cache(self.find(split))
        return self._open[split]

    def present(self) -> list[str]:
        """The splits that have a matching cache: the dataset's own splits in their order, then others sorted."""
        from vtbench.data import dataset_info
        from vtbench.paths import cache_dir

        found = {m["split"] for _, m in _candidates(cache_dir(self.cache_dir), self.model, self.dataset, None,
                                                    self.weights, self.settings, self.data_root)}
        declared = list(dataset_info(self.dataset).splits)
        return [s for s in declared if s in found] + sorted(found - set(declared))

    def has(self, split: str) -> bool:
        return split in self.present()

    def split(self, names: list[str], description=None):
        """Several splits' caches as one evaluation split (:class:`vtbench.transfer.features.Split`)."""
        from vtbench.transfer.features import Split

        caches = [self.get(n) for n in names]
        return Split(list(names), caches, description=list(names) if description is None else description)

    def check(self, kinds=None) -> None:
        """Every opened cache must come from the same model, weights and settings, with the same classes, and
        hold the same number of blocks of every kind in ``kinds`` (default: the reference's)."""
        if len(self._open) > 1:
            check_compatible(dict(self._open))
        ref_name, ref = next(iter(self._open.items()))
        kinds = set(ref.kinds) if kinds is None else set(kinds)
        for name, other in self._open.items():
            if other.class_names != ref.class_names:
                raise VTError(f"the {ref_name} and {name} caches have different class lists; re-extract them together")
            mine = {k: n for k, n in other.kinds.items() if k in kinds}
            theirs = {k: n for k, n in ref.kinds.items() if k in kinds}
            if mine != theirs:
                raise VTError(f"the {ref_name} and {name} caches hold different token kinds ({ref.kinds} vs {other.kinds})")

    @property
    def opened(self) -> dict[str, FeatureCache]:
        return dict(self._open)

    @property
    def reference(self) -> FeatureCache:
        return next(iter(self._open.values()))

    def close(self) -> None:
        for cache in self._open.values():
            cache.close()
