"""Official-layout loaders on miniatures of their exact layouts, and on the real files in ../shared/data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtbench.data import available_splits, canonical_spec, dataset_info, get_dataset
from vtbench.errors import VTError


def write_image(path: Path, value: int, size: int = 8) -> None:
    """A tiny solid-colour image; the format follows the suffix (.jpg, .ppm, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, (3 * value) % 256, 200)).save(path)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# --- miniatures: each returns (root to pass, {split: (image_ids, labels)}, class_names) ------------


def mini_cub(tmp: Path):
    base = tmp / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    write_lines(base / "classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    images, labels, split = [], [], []
    for n in range(6):
        cls = n % 3
        rel = f"{classes[cls]}/{classes[cls][4:]}_{n:04d}_1.jpg"
        write_image(base / "images" / rel, n)
        images.append(f"{n + 1} {rel}")
        labels.append(f"{n + 1} {cls + 1}")
        split.append(f"{n + 1} {1 if n < 4 else 0}")
    write_lines(base / "images.txt", images)
    write_lines(base / "image_class_labels.txt", labels)
    write_lines(base / "train_test_split.txt", split)
    ids = [f"images/{line.split()[1]}" for line in images]
    return tmp, {"train": (ids[:4], [0, 1, 2, 0]), "test": (ids[4:], [1, 2])}, classes


def mini_aircraft(tmp: Path):
    data = tmp / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    write_lines(data / "variants.txt", variants)
    parts = {"train": [("0034309", 0), ("0034958", 2)], "val": [("0037511", 1)], "test": [("0062765", 2), ("1025794", 1)]}
    parts["trainval"] = parts["train"] + parts["val"]
    for split, rows in parts.items():
        write_lines(data / f"images_variant_{split}.txt", [f"{i} {variants[v]}" for i, v in rows])
        for i, v in rows:
            write_image(data / "images" / f"{i}.jpg", int(i) % 97)
    expected = {s: ([f"data/images/{i}.jpg" for i, _ in rows], [v for _, v in rows]) for s, rows in parts.items()}
    return tmp, expected, variants


def mini_dtd(tmp: Path):
    classes = ["banded", "blotchy", "braided"]
    for c, cls in enumerate(classes):
        for n in range(1, 5):
            write_image(tmp / "images" / cls / f"{cls}_{n:04d}.jpg", 10 * c + n)
    folds = {"train": 1, "val": 2, "test": (3, 4)}
    expected = {}
    for split, numbers in folds.items():
        numbers = numbers if isinstance(numbers, tuple) else (numbers,)
        lines = [f"{cls}/{cls}_{n:04d}.jpg" for cls in classes for n in numbers]
        write_lines(tmp / "labels" / f"{split}1.txt", lines)
        expected[split] = ([f"images/{line}" for line in lines], [classes.index(line.split("/")[0]) for line in lines])
    # Fold 2 swaps train and val, so reading the wrong fold shows.
    write_lines(tmp / "labels" / "train2.txt", [i[len("images/"):] for i in expected["val"][0]])
    expected["trainval"] = (expected["train"][0] + expected["val"][0], expected["train"][1] + expected["val"][1])
    return tmp, expected, classes


def mini_gtsrb(tmp: Path):
    base = tmp / "gtsrb" / "GTSRB"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    train_ids, train_labels = [], []
    for cls in (0, 1, 2):
        folder = base / "Training" / f"{cls:05d}"
        names = [f"{track:05d}_{frame:05d}.ppm" for track in range(2) for frame in (0, 29)]
        for n, name in enumerate(names):
            write_image(folder / name, 40 * cls + n)
        write_lines(folder / f"GT-{cls:05d}.csv", [header] + [f"{name};8;8;1;1;7;7;{cls}" for name in names])
        train_ids += [f"GTSRB/Training/{cls:05d}/{name}" for name in names]
        train_labels += [cls] * len(names)
    test = [(f"{n:05d}.ppm", cls) for n, cls in enumerate([2, 0, 1, 1])]
    for n, (name, _) in enumerate(test):
        write_image(base / "Final_Test" / "Images" / name, 200 + n)
    write_lines(tmp / "gtsrb" / "GT-final_test.csv", [header] + [f"{name};8;8;1;1;7;7;{cls}" for name, cls in test])
    expected = {"train": (train_ids, train_labels),
                "test": ([f"GTSRB/Final_Test/Images/{name}" for name, _ in test], [cls for _, cls in test])}
    return tmp, expected, [f"{i:05d}" for i in range(43)]


def write_coco(path: Path, images: list[tuple[int, str, int]], categories: list[tuple[int, str]]) -> None:
    coco = {
        "images": [{"id": i, "file_name": f, "width": 8, "height": 8} for i, f, _ in images],
        "annotations": [{"id": 100 + i, "image_id": i, "category_id": c} for i, _, c in images],
        "categories": [{"id": c, "name": name, "supercategory": "x"} for c, name in categories],
    }
    path.write_text(json.dumps(coco))


def mini_coco(tmp: Path, files: dict[str, str], prefix: str):
    # Category ids out of order and not contiguous: classes are sorted by id.
    categories = [(7, "Amanita muscaria"), (2, "Boletus edulis"), (5, "Cantharellus cibarius")]
    class_names = ["Boletus edulis", "Cantharellus cibarius", "Amanita muscaria"]
    label_of = {2: 0, 5: 1, 7: 2}
    parts = {"train": [(11, 7), (12, 2), (13, 5), (14, 2)], "val": [(21, 5), (22, 7)]}
    expected = {}
    for split, rows in parts.items():
        images = [(i, f"{prefix}/{c}/{i:08x}.jpg", c) for i, c in rows]
        for i, f, _ in images:
            write_image(tmp / f, i)
        write_coco(tmp / files[split], images, categories)
        expected[split] = ([f for _, f, _ in images], [label_of[c] for _, _, c in images])
    return tmp, expected, class_names


def mini_fungi(tmp: Path):
    return mini_coco(tmp, {"train": "train.json", "val": "val.json"}, "images/Fungi")


def mini_inat2019(tmp: Path):
    return mini_coco(tmp, {"train": "train2019.json", "val": "val2019.json"}, "train_val2019/Fungi")


def mini_places365(tmp: Path, size: str = "256"):
    classes = ["/a/airfield", "/b/bakery/shop", "/c/canyon"]
    write_lines(tmp / "categories_places365.txt", [f"{c} {i}" for i, c in enumerate(classes)])
    train = [(f"{c}/{n:08d}.jpg", i) for i, c in enumerate(classes) for n in (1, 2)]
    val = [(f"Places365_val_{n:08d}.jpg", cls) for n, cls in enumerate([2, 0, 1], start=1)]
    write_lines(tmp / "places365_train_standard.txt", [f"{f} {i}" for f, i in train])
    write_lines(tmp / "places365_val.txt", [f"{f} {i}" for f, i in val])
    for n, (f, _) in enumerate(train):
        write_image(tmp / f"data_{size}_standard" / f.lstrip("/"), n)
    for n, (f, _) in enumerate(val):
        write_image(tmp / f"val_{size}" / f, 50 + n)
    expected = {"train": ([f"data_{size}_standard{f}" for f, _ in train], [i for _, i in train]),
                "val": ([f"val_{size}/{f}" for f, _ in val], [i for _, i in val])}
    return tmp, expected, classes


MINIATURES = {
    "cub": mini_cub,
    "aircraft": mini_aircraft,
    "dtd": mini_dtd,
    "gtsrb": mini_gtsrb,
    "fungi": mini_fungi,
    "inat2019": mini_inat2019,
    "places365": mini_places365,
}


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_official_layout_miniature(name, tmp_path):
    root, expected, class_names = MINIATURES[name](tmp_path)
    info = dataset_info(name)
    assert sorted(expected) == sorted(info.splits)
    assert available_splits(name, root) == list(info.splits)
    for split, (ids, labels) in expected.items():
        ds = get_dataset(name, split, root)
        assert ds.name == canonical_spec(name) and ds.split == split
        assert ds.image_ids == ids
        assert ds.labels.dtype == np.int64 and ds.labels.tolist() == labels
        assert ds.class_names == class_names
        assert len(ds) == len(ids)
        img = ds.load(0)
        assert img.mode == "RGB" and img.size == (8, 8)
        # Picklable for DataLoader workers: the copy reads the same pixels.
        clone = pickle.loads(pickle.dumps(ds))
        assert np.array_equal(as_array(clone.load(len(ds) - 1)), as_array(ds.load(len(ds) - 1)))
        assert clone.fingerprint == ds.fingerprint
    # Fingerprint: stable across loads, changes when a file's size changes.
    first = get_dataset(name, info.train_split, root)
    again = get_dataset(name, info.train_split, root)
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 64
    with open(Path(first.root) / first.image_ids[-1], "ab") as fh:
        fh.write(b"\0")
    assert get_dataset(name, info.train_split, root).fingerprint != first.fingerprint
    # Another split has another fingerprint.
    assert get_dataset(name, info.test_split, root).fingerprint != first.fingerprint


def test_cub_and_aircraft_accept_the_dataset_folder_as_root(tmp_path):
    mini_cub(tmp_path)
    mini_aircraft(tmp_path)
    for name, folder in (("cub", "CUB_200_2011"), ("aircraft", "fgvc-aircraft-2013b")):
        via_parent = get_dataset(name, "test", tmp_path)
        direct = get_dataset(name, "test", tmp_path / folder)
        assert direct.image_ids == via_parent.image_ids and direct.fingerprint == via_parent.fingerprint
        assert Path(direct.root) == (tmp_path / folder).resolve()


def test_gtsrb_accepts_parent_or_gtsrb_folder_and_data_root_env(tmp_path, monkeypatch):
    mini_gtsrb(tmp_path / "gtsrb-parent")
    parent = tmp_path / "gtsrb-parent"
    a = get_dataset("gtsrb", "train", parent)
    b = get_dataset("gtsrb", "train", parent / "gtsrb")
    monkeypatch.setenv("VT_DATA", str(parent))  # $VT_DATA/gtsrb is the gtsrb folder
    c = get_dataset("gtsrb", "train")
    assert a.image_ids == b.image_ids == c.image_ids and a.fingerprint == b.fingerprint == c.fingerprint


def test_dtd_fold_argument(tmp_path):
    mini_dtd(tmp_path)
    assert canonical_spec("dtd") == "dtd:1" and canonical_spec("dtd:02") == "dtd:2"
    fold2 = get_dataset("dtd:2", "train", tmp_path)
    assert fold2.name == "dtd:2"
    assert fold2.image_ids == get_dataset("dtd", "val", tmp_path).image_ids
    with pytest.raises(VTError, match=r"no labels/val2.txt under"):
        get_dataset("dtd:2", "val", tmp_path)
    for bad in ("dtd:0", "dtd:x"):
        with pytest.raises(VTError, match="fold must be a positive integer"):
            canonical_spec(bad)


def test_places365_sizes(tmp_path):
    mini_places365(tmp_path, size="large")
    assert canonical_spec("places365") == "places365:small"
    large = get_dataset("places365:large", "val", tmp_path)
    assert large.name == "places365:large" and large.image_ids[0] == "val_large/Places365_val_00000001.jpg"
    with pytest.raises(VTError, match=r"places365: no val_256/ under .*expected .*categories_places365.txt"):
        get_dataset("places365", "val", tmp_path)
    with pytest.raises(VTError, match="small or large"):
        canonical_spec("places365:medium")


def test_transfer_split_info():
    table = {
        "cub": ("train", None, "test", ("train",)),
        "aircraft": ("train", "val", "test", ("train",)),
        "dtd": ("train", "val", "test", ("train", "val")),
        "gtsrb": ("train", None, "test", ("train",)),
        "fungi": ("train", None, "val", ("train",)),
        "places365": ("train", None, "val", ("train",)),
        "inat2019": ("train", None, "val", ("train",)),
        "digits": ("train", None, "test", ("train",)),
        "imagefolder:/x": ("train", "val", "test", ("train",)),
    }
    for spec, split_info in table.items():
        info = dataset_info(spec)
        assert (info.train_split, info.val_split, info.test_split, info.paper_train_splits) == split_info
        assert info.generic == spec.startswith("imagefolder")


# --- errors ------------------------------------------------------------------------------------


def one_line_error(call, *args) -> str:
    with pytest.raises(VTError) as exc:
        call(*args)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_root_names_the_layout(tmp_path):
    message = one_line_error(get_dataset, "dtd", "train")
    assert message.startswith("dtd: no dataset root given; expected <root>/images/<class>/*.jpg")
    assert "pass --root or set $VT_DATA" in message
    message = one_line_error(get_dataset, "cub", "train", tmp_path / "absent")
    assert message.startswith(f"cub: no folder {tmp_path / 'absent'}; expected <root>/CUB_200_2011/")


def test_missing_annotation_file_names_it(tmp_path):
    mini_dtd(tmp_path)
    (tmp_path / "labels" / "test1.txt").unlink()
    message = one_line_error(get_dataset, "dtd", "test", tmp_path)
    assert message.startswith(f"dtd: no labels/test1.txt under {tmp_path.resolve()}; expected <root>/images/")
    mini_fungi(tmp_path / "fungi")
    (tmp_path / "fungi" / "val.json").unlink()
    assert "fungi: no val.json under" in one_line_error(get_dataset, "fungi", "val", tmp_path / "fungi")
    mini_gtsrb(tmp_path / "g")
    (tmp_path / "g" / "gtsrb" / "GT-final_test.csv").unlink()
    assert "gtsrb: no GT-final_test.csv under" in one_line_error(get_dataset, "gtsrb", "test", tmp_path / "g")


def test_broken_annotations_are_layout_errors(tmp_path):
    mini_aircraft(tmp_path)
    with open(tmp_path / "fgvc-aircraft-2013b/data/images_variant_test.txt", "a") as fh:
        fh.write("0099999 Concorde\n")
    assert "names class 'Concorde'" in one_line_error(get_dataset, "aircraft", "test", tmp_path)
    mini_cub(tmp_path)
    with open(tmp_path / "CUB_200_2011/images.txt", "a") as fh:
        fh.write("7\n")
    assert "line 7 of" in one_line_error(get_dataset, "cub", "train", tmp_path)
    mini_fungi(tmp_path / "f")
    (tmp_path / "f" / "val.json").write_text("{not json")
    assert "val.json is not valid JSON" in one_line_error(get_dataset, "fungi", "val", tmp_path / "f")
    (tmp_path / "f" / "val.json").write_text('{"images": []}')
    assert "is not a COCO-style annotation file" in one_line_error(get_dataset, "fungi", "val", tmp_path / "f")


def test_unknown_name_and_split():
    message = one_line_error(get_dataset, "imagenet", "train")
    assert message.startswith("unknown dataset 'imagenet'; registered: aircraft, csv, cub, digits, dtd")
    message = one_line_error(get_dataset, "gtsrb", "val", "/nonexistent")
    assert message == "gtsrb has no split 'val'; valid splits: train, test"
    assert "takes no ':' argument" in one_line_error(canonical_spec, "gtsrb:1")


def test_corrupt_image_raises_on_load(tmp_path):
    root, expected, _ = mini_dtd(tmp_path)
    ds = get_dataset("dtd", "train", root)
    path = Path(ds.root) / ds.image_ids[1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated JPEG
    (Path(ds.root) / ds.image_ids[2]).write_bytes(b"not an image at all")
    ds.load(0)
    for i in (1, 2):
        with pytest.raises(OSError, match=ds.image_ids[i]):
            ds.load(i)


# --- real files in ../shared/data --------------------------------------------------------------


@pytest.mark.shared
def test_shared_gtsrb_matches_readme_and_torchvision(shared_data):
    from torchvision.datasets import GTSRB

    train = get_dataset("gtsrb", "train", shared_data / "gtsrb")
    test = get_dataset("gtsrb", "test", shared_data)  # torchvision's root: the parent of gtsrb/
    assert (len(train), len(test)) == (1720, 860)
    assert len(train.class_names) == 43
    assert np.bincount(train.labels, minlength=43).tolist() == [40] * 43
    assert np.bincount(test.labels, minlength=43).tolist() == [20] * 43
    for ours in (train, test):
        theirs = GTSRB(str(shared_data), split=ours.split)._samples
        assert [str(Path(ours.root) / i) for i in ours.image_ids] == [str(Path(p).resolve()) for p, _ in theirs]
        assert ours.labels.tolist() == [label for _, label in theirs]
        for i in (0, len(ours) // 2, len(ours) - 1):
            img = ours.load(i)
            assert img.mode == "RGB" and min(img.size) > 10


@pytest.mark.shared
def test_shared_dtd_matches_readme(shared_data):
    sizes = {split: get_dataset("dtd", split, shared_data / "dtd") for split in ("train", "val", "test", "trainval")}
    assert {s: len(d) for s, d in sizes.items()} == {"train": 130, "val": 130, "test": 140, "trainval": 260}
    classes = sizes["train"].class_names
    assert len(classes) == 10 and classes[0] == "banded" and classes[-1] == "crystalline"
    assert np.bincount(sizes["test"].labels).tolist() == [14] * 10
    assert set(sizes["train"].image_ids).isdisjoint(sizes["test"].image_ids)
    for i in (0, 70, 139):
        assert sizes["test"].load(i).mode == "RGB"
    # The label of every image is its class folder.
    for ds in sizes.values():
        assert all(i.split("/")[1] == classes[y] for i, y in zip(ds.image_ids, ds.labels))
