"""Generic sources (imagefolder, csv, hf) and the bundled digits dataset."""

from __future__ import annotations

import csv
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtbench.data import available_splits, canonical_spec, get_dataset
from vtbench.errors import VTError


def write_image(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, 100, 200)).save(path)


# --- imagefolder -------------------------------------------------------------------------------


def test_imagefolder_classes_are_the_union_over_splits(tmp_path):
    # "Zebra" sorts before "ant" (case-sensitive); "cat" exists only in test.
    for split, classes in {"train": ["Zebra", "ant"], "test": ["ant", "cat"]}.items():
        for cls in classes:
            for n in range(2):
                write_image(tmp_path / split / cls / f"{cls}_{n}.png", n)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / "nested").mkdir()
    write_image(tmp_path / "train" / "ant" / "nested" / "deep.JPG", 9)
    spec = f"imagefolder:{tmp_path}"
    assert available_splits(spec) == ["test", "train"]
    train = get_dataset(spec, "train")
    test = get_dataset(spec, "test")
    assert train.class_names == test.class_names == ["Zebra", "ant", "cat"]
    assert train.image_ids == ["train/Zebra/Zebra_0.png", "train/Zebra/Zebra_1.png", "train/ant/ant_0.png",
                               "train/ant/ant_1.png", "train/ant/nested/deep.JPG"]
    assert train.labels.tolist() == [0, 0, 1, 1, 1]
    assert test.labels.tolist() == [1, 1, 2, 2]
    assert pickle.loads(pickle.dumps(test)).load(3).mode == "RGB"
    with pytest.raises(VTError, match=r"has no split 'val'; valid splits: test, train"):
        get_dataset(spec, "val")


def test_imagefolder_spec_is_canonical(tmp_path, monkeypatch):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    write_image(tmp_path / "d" / "train" / "a" / "x.png", 1)
    monkeypatch.chdir(tmp_path)
    assert canonical_spec("imagefolder:./d") == f"imagefolder:{(tmp_path / 'd').resolve()}"
    assert get_dataset("imagefolder:d", "train").name == get_dataset(f"imagefolder:{tmp_path}/d/", "train").name
    with pytest.raises(VTError, match="imagefolder: no folder"):
        get_dataset("imagefolder:./absent", "train")


@pytest.mark.shared
def test_imagefolder_caltech101_agrees_with_labels_csv(shared_data):
    root = shared_data / "caltech101"
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    spec = f"imagefolder:{root}"
    assert available_splits(spec) == ["test", "train"]
    for split, count in (("train", 2020), ("test", 1010)):
        ds = get_dataset(spec, split)
        assert len(ds) == count and len(ds.class_names) == 101
        expected = {r["path"]: int(r["class_id"]) for r in rows if r["split"] == split}
        assert dict(zip(ds.image_ids, ds.labels.tolist())) == expected
        names = {int(r["class_id"]): r["class_name"] for r in rows}
        assert [ds.class_names[i] for i in sorted(names)] == [names[i] for i in sorted(names)]
        assert ds.load(0).mode == "RGB"


# --- csv ---------------------------------------------------------------------------------------


def test_csv_with_split_column_and_integer_labels(tmp_path):
    for n in range(5):
        write_image(tmp_path / "img" / f"{n}.png", n)
    (tmp_path / "list.csv").write_text(
        "path,label,split\n"
        "img/0.png,10,train\nimg/1.png,2,train\nimg/2.png,0,test\n\nimg/3.png,2,test\nimg/4.png,10,val\n"
    )
    spec = f"csv:{tmp_path / 'list.csv'}"
    assert available_splits(spec) == ["test", "train", "val"]
    train = get_dataset(spec, "train")
    assert train.class_names == ["0", "2", "10"]  # numeric order, not string order
    assert train.labels.tolist() == [2, 1]
    assert get_dataset(spec, "test").labels.tolist() == [0, 1]
    assert get_dataset(spec, "val").image_ids == ["img/4.png"]
    assert Path(train.root) == tmp_path.resolve()
    assert np.asarray(train.load(1))[0, 0, 0] == 1


def test_csv_split_template_and_name_labels(tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    write_image(tmp_path / "sub" / "c.png", 3)
    (tmp_path / "train.csv").write_text("label,path\nzebra,a.png\napple,b.png\n")
    (tmp_path / "test.csv").write_text("path,label\nsub/c.png,mango\n")
    spec = f"csv:{tmp_path}/{{split}}.csv"
    assert canonical_spec(spec).endswith("/{split}.csv")
    assert available_splits(spec) == ["test", "train"]
    train, test = get_dataset(spec, "train"), get_dataset(spec, "test")
    assert train.class_names == test.class_names == ["apple", "mango", "zebra"]
    assert train.labels.tolist() == [2, 0] and test.labels.tolist() == [1]
    assert test.load(0).size == (8, 8)


def test_csv_without_split_column_has_one_split(tmp_path):
    write_image(tmp_path / "a.png", 1)
    (tmp_path / "x.csv").write_text("path,label\na.png,1\n")
    spec = f"csv:{tmp_path / 'x.csv'}"
    assert available_splits(spec) == ["all"]
    assert len(get_dataset(spec, "all")) == 1
    with pytest.raises(VTError, match="has no split 'train'; valid splits: all"):
        get_dataset(spec, "train")


def test_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(VTError, match=r"csv: .*bad.csv has columns \['file', 'class'\], not path,label; expected FILE"):
        get_dataset(f"csv:{tmp_path / 'bad.csv'}", "all")
    with pytest.raises(VTError, match="csv: no file"):
        get_dataset(f"csv:{tmp_path / 'absent.csv'}", "all")
    with pytest.raises(VTError, match="csv: no file matches"):
        available_splits(f"csv:{tmp_path}/nothing-{{split}}.csv")
    (tmp_path / "dup.csv").write_text("path,label\na.png,1\na.png,2\n")
    with pytest.raises(VTError, match="more than once"):
        get_dataset(f"csv:{tmp_path / 'dup.csv'}", "all")


# --- hf (offline) ------------------------------------------------------------------------------


def colour_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (6 + i, 6), (20 * i, 0, 255 - 20 * i)) for i in range(n)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def test_hf_saved_to_disk(tmp_path, hf_cache):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "animal": datasets.ClassLabel(names=["cat", "dog", "emu"]),
                                  "note": datasets.Value("string")})
    images = colour_images(5)
    full = datasets.Dataset.from_dict({"img": images, "animal": [2, 0, 1, 0, 2], "note": list("abcde")},
                                      features=features)
    datasets.DatasetDict(train=full.select([0, 1, 2]), validation=full.select([3, 4])).save_to_disk(tmp_path / "saved")
    spec = f"hf:{tmp_path / 'saved'}"
    assert available_splits(spec) == ["train", "val"]
    val = get_dataset(spec, "val")
    assert val.split == "val" and val.name == canonical_spec(spec)
    assert get_dataset(spec, "validation").image_ids == val.image_ids == ["validation/0", "validation/1"]
    assert val.class_names == ["cat", "dog", "emu"] and val.labels.tolist() == [0, 2]
    img = pickle.loads(pickle.dumps(val)).load(1)
    assert img.mode == "RGB" and img.size == (10, 6) and img.getpixel((0, 0)) == (80, 0, 175)
    train = get_dataset(spec, "train")
    assert train.fingerprint == get_dataset(spec, "train").fingerprint != val.fingerprint
    with pytest.raises(VTError, match="has no split 'test'; valid splits: train, val"):
        get_dataset(spec, "test")


def test_hf_parquet_folder_with_plain_labels(tmp_path, hf_cache):
    import datasets

    features = datasets.Features({"picture": datasets.Image(), "species": datasets.Value("string"),
                                  "other": datasets.Image()})
    images = colour_images(4)
    data = tmp_path / "pq" / "data"
    data.mkdir(parents=True)
    parts = {"train": ([0, 1, 2], ["oak", "elm", "oak"]), "test": ([3], ["ash"])}
    for split, (rows, species) in parts.items():
        ds = datasets.Dataset.from_dict({"picture": [images[i] for i in rows], "species": species,
                                         "other": [images[0]] * len(rows)}, features=features)
        ds.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    spec = f"hf:{tmp_path / 'pq'}"
    with pytest.raises(VTError, match=r"cannot tell the image column \(picture, other found\); name it with \?image="):
        get_dataset(spec, "train")
    spec += "?label=species&image=picture"
    assert canonical_spec(spec) == f"hf:{(tmp_path / 'pq').resolve()}?image=picture&label=species"
    assert sorted(available_splits(spec)) == ["test", "train"]
    train, test = get_dataset(spec, "train"), get_dataset(spec, "test")
    # Classes from both splits, so "ash" (test only) keeps one label everywhere.
    assert train.class_names == test.class_names == ["ash", "elm", "oak"]
    assert train.labels.tolist() == [2, 1, 2] and test.labels.tolist() == [0]
    assert test.load(0).getpixel((0, 0)) == (60, 0, 195)


def test_hf_hub_id_from_the_local_cache_without_network(tmp_path, hf_cache, monkeypatch):
    """A cached hub id loads at once when the hub cannot be reached; an uncached one fails in one line."""
    import datasets

    import vtbench.network

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = tmp_path / "pq" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": colour_images(4), "label": [0, 1, 1, 0]}, features=features).to_parquet(
        str(data / "train-00000-of-00001.parquet"))
    datasets.load_dataset(str(tmp_path / "pq"))  # prepares it in the Arrow cache
    # Lay that cache entry out as `datasets` caches the hub dataset someone/toy.
    prepared = next((tmp_path / "hf-cache" / "pq").glob("*/*/*/dataset_info.json")).parent
    hub_entry = tmp_path / "hf-cache" / "someone___toy" / "default" / "0.0.0" / prepared.name
    hub_entry.mkdir(parents=True)
    (hub_entry / "dataset_info.json").write_bytes((prepared / "dataset_info.json").read_bytes())
    (hub_entry / "toy-train.arrow").write_bytes((prepared / "pq-train.arrow").read_bytes())

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as on a machine whose network is down
    probes = []
    monkeypatch.setattr(vtbench.network, "host_reachable", lambda url, *a, **k: probes.append(url) or False)
    start = time.perf_counter()
    train = get_dataset("hf:someone/toy", "train")
    assert time.perf_counter() - start < 10  # datasets alone retries for about 45 s first
    assert probes and datasets.config.HF_HUB_OFFLINE  # switched to the local cache
    assert train.labels.tolist() == [0, 1, 1, 0] and train.load(2).getpixel((0, 0)) == (40, 0, 215)
    with pytest.raises(VTError, match=r"hf: someone/other is not in the local datasets cache .* and offline mode "
                                      r"is set .*; pass a save_to_disk folder") as info:
        get_dataset("hf:someone/other", "train")
    assert "\n" not in str(info.value)


def test_hf_errors(tmp_path, hf_cache, monkeypatch):
    with pytest.raises(VTError, match="hf: unknown option split"):
        canonical_spec("hf:x?split=train")
    with pytest.raises(VTError, match="hf: no folder .*empty-dir-that-is-not-there; expected NAME: a save_to_disk"):
        get_dataset(f"hf:{tmp_path / 'empty-dir-that-is-not-there'}", "train")
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(VTError, match="hf: cannot open .*not-a-dataset: "):
        get_dataset(f"hf:{tmp_path / 'not-a-dataset'}", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(VTError, match="pip install datasets"):
        get_dataset("hf:someone/something", "train")


# --- digits ------------------------------------------------------------------------------------


def test_digits_stratified_seeded_split():
    from sklearn.datasets import load_digits

    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(train), len(test)) == (898, 899)
    assert set(train.image_ids).isdisjoint(test.image_ids)
    assert len(set(train.image_ids) | set(test.image_ids)) == 1797
    assert np.abs(np.bincount(train.labels) - np.bincount(test.labels)).max() <= 1
    assert get_dataset("digits", "train").image_ids == train.image_ids  # seeded: same split every time
    digits = load_digits()
    i = int(train.image_ids[5])
    assert train.labels[5] == digits.target[i]
    img = pickle.loads(pickle.dumps(train)).load(5)
    assert img.mode == "RGB" and img.size == (8, 8)
    expected = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.asarray(img)[:, :, 1], expected)
    assert train.fingerprint != test.fingerprint
    assert get_dataset("digits", "train", root="/ignored").fingerprint == train.fingerprint
