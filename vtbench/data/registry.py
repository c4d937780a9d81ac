"""The dataset registry: one table of loaders, looked up by a spec ``NAME[:ARG]``.

A loader is registered with :func:`register_dataset` (like timm's model
registry) together with its :class:`DatasetInfo`. Every public function takes a
spec: ``dtd`` or ``dtd:2`` (fold), ``places365:large``, ``imagefolder:/data/x``,
``csv:/d/{split}.csv``, ``hf:NAME?label=COL``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vtbench.data.imageset import ImageSet
from vtbench.errors import VTError
from vtbench.paths import data_root


@dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset is, where its files must be, and which splits a probe uses."""

    name: str
    summary: str
    layout: str  # the on-disk layout expected under the root, one line
    splits: tuple[str, ...]
    train_split: str
    val_split: str | None
    test_split: str
    paper_train_splits: tuple[str, ...]  # what the IPViT paper trained its probes on
    generic: bool = False  # splits are discovered on disk (imagefolder, csv, hf)
    needs_root: bool = True  # files come from --root / $VT_DATA (generic specs carry their own path)


@dataclass(frozen=True)
class DatasetRequest:
    """What a loader is asked for: ``spec`` is canonical, ``root`` resolved (None for generic sources)."""

    spec: str
    arg: str | None
    split: str
    root: Path | None


def no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise VTError(f"{name} takes no ':' argument (got '{name}:{arg}')")
    return None


def path_arg(name: str, arg: str | None) -> str:
    """A filesystem path argument, made absolute so the spec names one place."""
    if not arg:
        raise VTError(f"{name} needs a path: {name}:PATH")
    return str(Path(arg).expanduser().resolve())


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    load: Callable[[DatasetRequest], ImageSet]
    parse_arg: Callable[[str, str | None], str | None]
    discover_splits: Callable[[str | None], list[str]] | None


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    info: DatasetInfo,
    *,
    parse_arg: Callable[[str, str | None], str | None] = no_arg,
    discover_splits: Callable[[str | None], list[str]] | None = None,
):
    """Decorator registering ``load(request) -> ImageSet`` under ``info.name``.

    ``parse_arg(name, arg)`` validates the spec argument and returns its
    canonical form. Generic sources pass ``discover_splits(arg)``, the splits
    found on disk.
    """

    def decorator(load):
        if info.name in _REGISTRY:
            raise ValueError(f"dataset {info.name!r} is already registered")
        _REGISTRY[info.name] = _Entry(info, load, parse_arg, discover_splits)
        return load

    return decorator


def _parse(spec: str) -> tuple[_Entry, str | None, str]:
    """``(entry, canonical arg, canonical spec)`` for a spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise VTError("empty dataset name")
    name, sep, arg = spec.strip().partition(":")
    name = name.lower()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise VTError(f"unknown dataset '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    arg = entry.parse_arg(name, arg if sep else None)
    return entry, arg, name if arg is None else f"{name}:{arg}"


def canonical_spec(spec: str) -> str:
    """The one name a dataset goes by in caches and results: ``dtd`` -> ``dtd:1``, paths made absolute."""
    return _parse(spec)[2]


def dataset_info(spec: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a spec's dataset."""
    return _parse(spec)[0].info


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset, sorted by name."""
    return [_REGISTRY[name].info for name in sorted(_REGISTRY)]


ROOT_HINT = "pass --root or set $VT_DATA"


def layout_error(info: DatasetInfo, problem: str, root_hint: str = ROOT_HINT) -> VTError:
    """The one-line error for data that is not where the layout says it should be."""
    hint = f" ({root_hint})" if info.needs_root else ""
    return VTError(f"{info.name}: {problem}; expected {info.layout}{hint}")


def resolve_root(spec: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder a spec's files are read from: ``root``, else ``$VT_DATA/<name>``.

    None when neither is given, or when the dataset needs no root (see ``DatasetInfo.needs_root``).
    """
    entry, _, _ = _parse(spec)
    if not entry.info.needs_root:
        return None
    return data_root(entry.info.name, root)


def checked_root(spec: str, root: str | os.PathLike | None = None, root_hint: str = ROOT_HINT) -> Path | None:
    """:func:`resolve_root`, resolved; a one-line layout error when a dataset that needs a root has none."""
    info = dataset_info(spec)
    if not info.needs_root:
        return None
    root_dir = data_root(info.name, root)
    if root_dir is None:
        raise layout_error(info, "no dataset root given", root_hint)
    if not root_dir.is_dir():
        raise layout_error(info, f"no folder {root_dir}", root_hint)
    return root_dir.resolve()


def available_splits(spec: str, root: str | os.PathLike | None = None) -> list[str]:
    """Splits present on disk (generic sources) or the declared ones (official datasets)."""
    entry, arg, _ = _parse(spec)
    if entry.discover_splits is not None:
        return entry.discover_splits(arg)
    return list(entry.info.splits)


def check_split(spec: str, split: str, splits) -> None:
    """Raise VTError unless ``split`` is one of ``splits``."""
    if split not in splits:
        raise VTError(f"{spec} has no split '{split}'; valid splits: {', '.join(splits) or 'none'}")


def get_dataset(spec: str, split: str, root: str | os.PathLike | None = None) -> ImageSet:
    """One split of a dataset. ``root`` defaults to ``$VT_DATA/<name>``; generic specs carry their own path."""
    entry, arg, canonical = _parse(spec)
    info = entry.info
    if entry.discover_splits is None:
        check_split(canonical, split, info.splits)
    return entry.load(DatasetRequest(canonical, arg, split, checked_root(spec, root)))
