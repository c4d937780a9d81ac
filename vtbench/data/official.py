"""Loaders for the IPViT transfer datasets, each reading its official (or torchvision's) layout.

Every loader returns a file-backed :class:`ImageSet` whose ``root`` is the
dataset's own folder and whose ``image_ids`` are paths relative to it.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

from vtbench.data.imageset import ImageSet
from vtbench.data.registry import DatasetInfo, DatasetRequest, layout_error, register_dataset
from vtbench.errors import VTError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def find_base(info: DatasetInfo, root: Path, marker: str, folder: str) -> Path:
    """``root`` if it holds ``marker``, else ``root/folder`` if that does (root may be the parent)."""
    for base in (root, root / folder):
        if (base / marker).exists():
            return base
    raise layout_error(info, f"no {marker} under {root} or {root / folder}")


def require(info: DatasetInfo, base: Path, relative: str) -> Path:
    path = base / relative
    if not path.exists():
        raise layout_error(info, f"no {relative} under {base}")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, stripped."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def read_pairs(info: DatasetInfo, path: Path, sep: str | None = None) -> list[tuple[str, str]]:
    """Lines ``KEY VALUE`` of an annotation file (VALUE may contain ``sep``); malformed lines are a layout error."""
    pairs = []
    for n, line in enumerate(read_lines(path), 1):
        parts = line.split(sep, 1)
        if len(parts) != 2:
            raise layout_error(info, f"line {n} of {path} is not '<id> <value>'")
        pairs.append((parts[0], parts[1].strip()))
    return pairs


def parse_int(info: DatasetInfo, text: str, source: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise layout_error(info, f"{source} has '{text}' where a class index belongs") from None


def subfolders(path: Path) -> list[str]:
    """Names of the visible sub-folders of ``path``, sorted (case-sensitive)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def walk_images(base: Path, folder: str) -> list[str]:
    """Image files under ``base/folder`` (recursively) as paths relative to ``base``, in sorted order.

    Hidden files and folders are skipped (e.g. macOS ``._*`` files, which are not images).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(base / folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # walk sub-folders in order
        rel = Path(dirpath).relative_to(base).as_posix()
        found.extend(f"{rel}/{f}" for f in sorted(filenames)
                     if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    return found


def label_lookup(info: DatasetInfo, class_names: list[str], source: Path):
    """``label(name)`` -> index in ``class_names``; an unknown name is a layout error naming ``source``."""
    index = {name: i for i, name in enumerate(class_names)}

    def label(name: str) -> int:
        if name not in index:
            raise layout_error(info, f"{source} names class '{name}', which is not a known class")
        return index[name]

    return label


# --- CUB-200-2011 -------------------------------------------------------------------------------

CUB = DatasetInfo(
    name="cub",
    summary="Caltech-UCSD Birds-200-2011: 200 bird species, 11,788 images",
    layout="<root>/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/} "
           "(root may be the CUB_200_2011 folder itself)",
    splits=("train", "test"),
    train_split="train", val_split=None, test_split="test",
    paper_train_splits=("train",),
)


@register_dataset(CUB)
def load_cub(req: DatasetRequest) -> ImageSet:
    base = find_base(CUB, req.root, "images.txt", "CUB_200_2011")
    files = {f: require(CUB, base, f) for f in ("images.txt", "image_class_labels.txt",
                                                 "train_test_split.txt", "classes.txt")}
    classes = read_pairs(CUB, files["classes.txt"])
    class_names = [name for _, name in classes]
    class_index = {cid: i for i, (cid, _) in enumerate(classes)}
    paths = dict(read_pairs(CUB, files["images.txt"]))
    class_of = dict(read_pairs(CUB, files["image_class_labels.txt"]))
    is_train = dict(read_pairs(CUB, files["train_test_split.txt"]))
    want = "1" if req.split == "train" else "0"
    ids = [i for i in paths if is_train.get(i) == want]
    missing = [i for i in ids if class_of.get(i) not in class_index]
    if missing:
        raise layout_error(CUB, f"image {missing[0]} has no valid class in image_class_labels.txt under {base}")
    return ImageSet(req.spec, req.split, class_names, [class_index[class_of[i]] for i in ids],
                    [f"images/{paths[i]}" for i in ids], base)


# --- FGVC-Aircraft ------------------------------------------------------------------------------

AIRCRAFT = DatasetInfo(
    name="aircraft",
    summary="FGVC-Aircraft 2013b: 100 aircraft variants, 10,000 images",
    layout="<root>/fgvc-aircraft-2013b/data/{variants.txt,images_variant_{train,val,trainval,test}.txt,"
           "images/<id>.jpg} (root may be the fgvc-aircraft-2013b folder itself)",
    splits=("train", "val", "trainval", "test"),
    train_split="train", val_split="val", test_split="test",
    paper_train_splits=("train",),
)


@register_dataset(AIRCRAFT)
def load_aircraft(req: DatasetRequest) -> ImageSet:
    base = find_base(AIRCRAFT, req.root, "data/variants.txt", "fgvc-aircraft-2013b")
    class_names = read_lines(base / "data/variants.txt")
    split_file = require(AIRCRAFT, base, f"data/images_variant_{req.split}.txt")
    label = label_lookup(AIRCRAFT, class_names, split_file)
    rows = read_pairs(AIRCRAFT, split_file, sep=" ")
    return ImageSet(req.spec, req.split, class_names, [label(variant) for _, variant in rows],
                    [f"data/images/{image}.jpg" for image, _ in rows], base)


# --- DTD ----------------------------------------------------------------------------------------

DTD = DatasetInfo(
    name="dtd",
    summary="Describable Textures Dataset: 47 texture classes, 10 official folds (dtd:N picks fold N, default 1)",
    layout="<root>/images/<class>/*.jpg and <root>/labels/{train,val,test}N.txt (root may be the parent of dtd/)",
    splits=("train", "val", "test", "trainval"),
    train_split="train", val_split="val", test_split="test",
    paper_train_splits=("train", "val"),
)


def fold_arg(name: str, arg: str | None) -> str:
    """DTD's fold number, a positive integer; 1 when not given."""
    if arg is None:
        return "1"
    if not arg.strip().isdigit() or int(arg) < 1:
        raise VTError(f"{name}: the fold must be a positive integer, as in {name}:1 (got '{arg}')")
    return str(int(arg))


@register_dataset(DTD, parse_arg=fold_arg)
def load_dtd(req: DatasetRequest) -> ImageSet:
    base = find_base(DTD, req.root, "images", "dtd")
    class_names = subfolders(base / "images")
    parts = ("train", "val") if req.split == "trainval" else (req.split,)
    image_ids, labels = [], []
    for part in parts:
        split_file = require(DTD, base, f"labels/{part}{req.arg}.txt")
        label = label_lookup(DTD, class_names, split_file)
        for line in read_lines(split_file):
            image_ids.append(f"images/{line}")
            labels.append(label(line.split("/", 1)[0]))
    return ImageSet(req.spec, req.split, class_names, labels, image_ids, base)


# --- GTSRB --------------------------------------------------------------------------------------

GTSRB = DatasetInfo(
    name="gtsrb",
    summary="German Traffic Sign Recognition Benchmark: 43 sign classes (torchvision layout)",
    layout="<root>/gtsrb/GTSRB/Training/000NN/*.ppm, <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and "
           "<root>/gtsrb/GT-final_test.csv (root may be the gtsrb folder itself)",
    splits=("train", "test"),
    train_split="train", val_split=None, test_split="test",
    paper_train_splits=("train",),
)
GTSRB_CLASSES = [f"{i:05d}" for i in range(43)]


@register_dataset(GTSRB)
def load_gtsrb(req: DatasetRequest) -> ImageSet:
    base = find_base(GTSRB, req.root, "GTSRB", "gtsrb")
    if req.split == "train":
        training = require(GTSRB, base, "GTSRB/Training")
        label = label_lookup(GTSRB, GTSRB_CLASSES, training)
        image_ids, labels = [], []
        for folder in subfolders(training):
            files = walk_images(base, f"GTSRB/Training/{folder}")
            image_ids += files
            labels += [label(folder)] * len(files)
    else:
        require(GTSRB, base, "GTSRB/Final_Test/Images")
        table = require(GTSRB, base, "GT-final_test.csv")
        label = label_lookup(GTSRB, GTSRB_CLASSES, table)
        with open(table, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
        if rows and not {"Filename", "ClassId"} <= set(rows[0]):
            raise layout_error(GTSRB, f"{table} lacks the Filename and ClassId columns")
        image_ids = [f"GTSRB/Final_Test/Images/{row['Filename']}" for row in rows]
        labels = [label(f"{parse_int(GTSRB, row['ClassId'], table):05d}") for row in rows]
    return ImageSet(req.spec, req.split, GTSRB_CLASSES, labels, image_ids, base)


# --- COCO-style JSON annotations (FGVCx Fungi, iNaturalist) --------------------------------------


def load_coco_split(info: DatasetInfo, req: DatasetRequest, json_name: str) -> ImageSet:
    """A split described by one COCO-style JSON: images, annotations (one per image), categories.

    Class names come from the file's own categories, sorted by category id (the
    official files of every split list all categories, so labels agree).
    """
    path = require(info, req.root, json_name)
    try:
        with open(path, encoding="utf-8") as fh:
            coco = json.load(fh)
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        category_of = {a["image_id"]: a["category_id"] for a in coco["annotations"]}
        images = [(im["id"], im["file_name"]) for im in coco["images"]]
    except json.JSONDecodeError as exc:
        raise layout_error(info, f"{path} is not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise layout_error(info, f"{path} is not a COCO-style annotation file (missing {exc})") from None
    names = [str(c.get("name", c["id"])) for c in categories]
    # Names must identify classes; fall back to "name (id)" where two categories share one.
    uses = Counter(names)
    class_names = [n if uses[n] == 1 else f"{n} ({c['id']})" for n, c in zip(names, categories)]
    index = {c["id"]: i for i, c in enumerate(categories)}
    unlabelled = [file for image, file in images if category_of.get(image) not in index]
    if unlabelled:
        raise layout_error(info, f"{len(unlabelled)} images in {path} have no valid annotation, e.g. {unlabelled[0]}")
    return ImageSet(req.spec, req.split, class_names, [index[category_of[image]] for image, _ in images],
                    [file for _, file in images], req.root)


FUNGI = DatasetInfo(
    name="fungi",
    summary="FGVCx Fungi 2018: 1,394 fungi species; probes test on the official val split",
    layout="<root>/{train,val}.json (COCO-style) with images at the file_name paths they list, relative to <root>",
    splits=("train", "val"),
    train_split="train", val_split=None, test_split="val",
    paper_train_splits=("train",),
)


@register_dataset(FUNGI)
def load_fungi(req: DatasetRequest) -> ImageSet:
    return load_coco_split(FUNGI, req, f"{req.split}.json")


INAT2019 = DatasetInfo(
    name="inat2019",
    summary="iNaturalist 2019: 1,010 species; probes test on the official val split",
    layout="<root>/{train2019,val2019}.json (COCO-style) with images at the file_name paths they list "
           "(train_val2019/...), relative to <root>",
    splits=("train", "val"),
    train_split="train", val_split=None, test_split="val",
    paper_train_splits=("train",),
)


@register_dataset(INAT2019)
def load_inat2019(req: DatasetRequest) -> ImageSet:
    return load_coco_split(INAT2019, req, f"{req.split}2019.json")


# --- Places365 ----------------------------------------------------------------------------------

PLACES365 = DatasetInfo(
    name="places365",
    summary="Places365-Standard: 365 scene classes; places365:small (256x256, default) or places365:large",
    layout="<root>/categories_places365.txt, <root>/places365_{train_standard,val}.txt and the images in "
           "<root>/data_256_standard/ + <root>/val_256/ (large: data_large_standard/, val_large/), torchvision's layout",
    splits=("train", "val"),
    train_split="train", val_split=None, test_split="val",
    paper_train_splits=("train",),
)


def size_arg(name: str, arg: str | None) -> str:
    """Places365 image size: ``small`` (256x256, default) or ``large``."""
    arg = "small" if arg is None else arg.strip().lower()
    if arg not in ("small", "large"):
        raise VTError(f"{name}: the image size must be small or large, as in {name}:small (got '{arg}')")
    return arg


@register_dataset(PLACES365, parse_arg=size_arg)
def load_places365(req: DatasetRequest) -> ImageSet:
    size = "256" if req.arg == "small" else "large"
    categories = require(PLACES365, req.root, "categories_places365.txt")
    by_index = {parse_int(PLACES365, idx, categories): name for name, idx in read_pairs(PLACES365, categories)}
    if sorted(by_index) != list(range(len(by_index))):
        raise layout_error(PLACES365, f"{categories} does not number its classes 0..N-1")
    class_names = [by_index[i] for i in range(len(by_index))]
    if req.split == "train":
        file_list = require(PLACES365, req.root, "places365_train_standard.txt")
        # torchvision renames the archive's data_256/ to data_256_standard/; accept either.
        folders = [f"data_{size}_standard", f"data_{size}"]
    else:
        file_list = require(PLACES365, req.root, "places365_val.txt")
        folders = [f"val_{size}"]
    folder = next((f for f in folders if (req.root / f).is_dir()), None)
    if folder is None:
        raise layout_error(PLACES365, f"no {folders[0]}/ under {req.root}")
    rows = read_pairs(PLACES365, file_list)
    return ImageSet(req.spec, req.split, class_names, [parse_int(PLACES365, idx, file_list) for _, idx in rows],
                    [f"{folder}/{image.lstrip('/')}" for image, _ in rows], req.root)
