"""Generic sources whose splits are found on disk: ``imagefolder:PATH`` and ``csv:FILE``."""

from __future__ import annotations

import csv
import glob
import re
from pathlib import Path

from vtbench.data.imageset import ImageSet
from vtbench.data.official import subfolders, walk_images
from vtbench.data.registry import DatasetInfo, DatasetRequest, check_split, layout_error, path_arg, register_dataset

GENERIC_SPLITS = dict(
    splits=("train", "val", "test"),
    train_split="train", val_split="val", test_split="test",  # val is used only when present on disk
    paper_train_splits=("train",),
    generic=True,
    needs_root=False,
)


def classes_from_values(values: list) -> tuple[list[str], list[int]]:
    """Class names (sorted unique values; integers sorted numerically) and each value's index among them."""
    texts = [str(v).strip() for v in values]
    if texts and all(re.fullmatch(r"[+-]?\d+", t) for t in texts):
        numbers = [int(t) for t in texts]
        ordered = sorted(set(numbers))
        index = {n: i for i, n in enumerate(ordered)}
        return [str(n) for n in ordered], [index[n] for n in numbers]
    ordered = sorted(set(texts))
    index = {t: i for i, t in enumerate(ordered)}
    return ordered, [index[t] for t in texts]


# --- imagefolder:PATH ---------------------------------------------------------------------------

IMAGEFOLDER = DatasetInfo(
    name="imagefolder",
    summary="Any folder of images sorted into PATH/<split>/<class>/ (imagefolder:PATH)",
    layout="PATH/<split>/<class>/<image>; the classes are the sorted union of class folders over all splits",
    **GENERIC_SPLITS,
)


def imagefolder_splits(arg: str) -> list[str]:
    """The split folders under PATH."""
    base = Path(arg)
    if not base.is_dir():
        raise layout_error(IMAGEFOLDER, f"no folder {base}")
    splits = subfolders(base)
    if not splits:
        raise layout_error(IMAGEFOLDER, f"no split folders under {base}")
    return splits


@register_dataset(IMAGEFOLDER, parse_arg=path_arg, discover_splits=imagefolder_splits)
def load_imagefolder(req: DatasetRequest) -> ImageSet:
    base = Path(req.arg)
    splits = imagefolder_splits(req.arg)
    check_split(req.spec, req.split, splits)
    # Classes from every split, so that a class missing from one split keeps the same label in the others.
    class_names = sorted(set().union(*(subfolders(base / s) for s in splits)))
    image_ids, labels = [], []
    for label, name in enumerate(class_names):
        if (base / req.split / name).is_dir():
            files = walk_images(base, f"{req.split}/{name}")
            image_ids += files
            labels += [label] * len(files)
    return ImageSet(req.spec, req.split, class_names, labels, image_ids, base)


# --- csv:FILE -----------------------------------------------------------------------------------

CSV = DatasetInfo(
    name="csv",
    summary="Images listed in CSV files with a header path,label[,split] (csv:FILE, FILE may contain {split})",
    layout="FILE with a header row and columns path,label and optionally split (else FILE may contain {split}, "
           "as in /d/{split}.csv, else the one split is 'all'); paths are relative to FILE's folder",
    **GENERIC_SPLITS,
)
SPLIT_FIELD = "{split}"


def split_files(template: str) -> dict[str, Path]:
    """``{split: file}`` for every file matching a template such as ``/d/{split}.csv``."""
    parts = template.split(SPLIT_FIELD)
    pattern = "*".join(glob.escape(p) for p in parts)
    escaped = [re.escape(p) for p in parts]
    # The first {split} captures the name, any later one must repeat it.
    matcher = re.compile(escaped[0] + "(?P<split>[^/]+)" + "(?P=split)".join(escaped[1:]))
    found = {}
    for path in sorted(glob.glob(pattern)):
        match = matcher.fullmatch(path)
        if match:
            found[match["split"]] = Path(path)
    if not found:
        raise layout_error(CSV, f"no file matches {template}")
    return found


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file with at least the columns path and label."""
    if not path.is_file():
        raise layout_error(CSV, f"no file {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        if not {"path", "label"} <= set(reader.fieldnames):
            raise layout_error(CSV, f"{path} has columns {reader.fieldnames}, not path,label")
        rows = [row for row in reader if any((v or "").strip() for v in row.values())]
    if any(not (row["path"] or "").strip() or row["label"] is None for row in rows):
        raise layout_error(CSV, f"{path} has rows without a path or label")
    return rows


def csv_tables(arg: str) -> dict[str, tuple[Path, list[dict]]]:
    """``{split: (csv file, rows)}`` for a csv spec's argument."""
    if SPLIT_FIELD in arg:
        return {split: (path, read_csv(path)) for split, path in split_files(arg).items()}
    path = Path(arg)
    rows = read_csv(path)
    if rows and "split" in rows[0]:
        tables: dict[str, tuple[Path, list[dict]]] = {}
        for row in rows:
            tables.setdefault(row["split"].strip(), (path, []))[1].append(row)
        return dict(sorted(tables.items()))
    return {"all": (path, rows)}


def csv_splits(arg: str) -> list[str]:
    return list(csv_tables(arg))


@register_dataset(CSV, parse_arg=path_arg, discover_splits=csv_splits)
def load_csv(req: DatasetRequest) -> ImageSet:
    tables = csv_tables(req.arg)
    splits = list(tables)
    check_split(req.spec, req.split, splits)
    # Classes from every split, so labels agree across splits.
    class_names, labels = classes_from_values([row["label"] for _, rows in tables.values() for row in rows])
    start = sum(len(tables[s][1]) for s in splits[: splits.index(req.split)])
    path, rows = tables[req.split]
    return ImageSet(req.spec, req.split, class_names, labels[start:start + len(rows)],
                    [row["path"].strip() for row in rows], path.parent)
