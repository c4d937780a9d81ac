"""``hf:NAME[?image=COL&label=COL&config=CFG]``: a Hugging Face dataset through the ``datasets`` library.

NAME is a folder written by ``save_to_disk`` (read with ``load_from_disk``),
a folder of data files, or a hub id already in the local cache (both read with
``load_dataset``). ``datasets`` is imported only when such a spec is loaded.
When the hub cannot be reached, hub ids are read from the local cache at once
(``datasets`` itself would retry the network for about 45 s per request first).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from vtbench.data.generic import GENERIC_SPLITS, classes_from_values
from vtbench.data.imageset import HFImageSet
from vtbench.data.registry import DatasetInfo, DatasetRequest, check_split, layout_error, register_dataset
from vtbench.errors import VTError

HF = DatasetInfo(
    name="hf",
    summary="A Hugging Face dataset: hf:NAME[?image=COL&label=COL&config=CFG], offline from the local cache or disk",
    layout="NAME: a save_to_disk folder, a folder of data files, or a cached hub id; an Image column and a "
           "ClassLabel column (detected, or named with image=/label=)",
    **GENERIC_SPLITS,
)
OPTIONS = ("config", "image", "label")
# vtbench's split names -> the names datasets often use instead.
ALIASES = {"val": "validation"}


def parse_hf(arg: str) -> tuple[str, dict[str, str]]:
    """``(NAME, {option: value})`` of an hf spec's argument."""
    name, _, query = arg.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise VTError(f"hf: unknown option {', '.join(unknown)}; options: {', '.join(OPTIONS)}")
    if not name:
        raise VTError("hf needs a dataset: hf:NAME[?image=COL&label=COL&config=CFG]")
    return name, options


def hf_arg(name: str, arg: str | None) -> str:
    """Canonical hf argument: local folders made absolute, options sorted."""
    dataset, options = parse_hf(arg or "")
    if Path(dataset).expanduser().is_dir():
        dataset = str(Path(dataset).expanduser().resolve())
    query = "&".join(f"{k}={options[k]}" for k in sorted(options))
    return f"{dataset}?{query}" if query else dataset


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise VTError("hf: datasets need the Hugging Face 'datasets' package; pip install datasets") from None
    return datasets


def is_local(name: str) -> bool:
    """A folder on disk, or a path meant as one (hub ids are NAME or OWNER/NAME)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def offline_reason(datasets, name: str) -> str | None:
    """Why a hub id must come from the local cache (offline mode, or the hub is unreachable), else None.

    An unreachable hub switches ``datasets`` to offline mode for the rest of the process.
    """
    from vtbench.network import host_reachable

    if is_local(name):
        return None  # no network involved
    if datasets.config.HF_HUB_OFFLINE:
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    if host_reachable(datasets.config.HF_ENDPOINT):
        return None
    datasets.config.HF_HUB_OFFLINE = True
    return f"the hub ({datasets.config.HF_ENDPOINT}) cannot be reached"


def open_failed(datasets, name: str, offline: str | None, what: str, exc: Exception) -> VTError:
    """The one-line error for a dataset ``datasets`` could not open or load."""
    if offline:
        return VTError(f"hf: {name} is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                       f"and {offline}; pass a save_to_disk folder or a folder of data files, or load it "
                       f"once with the network")
    return VTError(f"hf: cannot {what}: {type(exc).__name__}: {exc}")


def is_saved_to_disk(name: str) -> bool:
    path = Path(name)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_splits(name: str, config: str | None) -> dict[str, str]:
    """``{vtbench split: datasets split}``: "validation" shows as "val" unless both exist."""
    datasets = import_datasets()
    if is_local(name) and not Path(name).expanduser().is_dir():
        raise layout_error(HF, f"no folder {name}")
    offline = offline_reason(datasets, name)
    try:
        if is_saved_to_disk(name):
            saved = datasets.load_from_disk(name)
            names = list(saved) if isinstance(saved, datasets.DatasetDict) else [str(saved.split or "all")]
        else:
            builder = datasets.load_dataset_builder(name, config)
            names = list(builder.info.splits or builder.config.data_files or [])
    except Exception as exc:  # datasets raises many types for a missing or unreadable dataset
        raise open_failed(datasets, name, offline, f"open {name}", exc) from None
    splits = {}
    for hf_split in names:
        short = next((k for k, v in ALIASES.items() if v == hf_split and k not in names), hf_split)
        splits[short] = hf_split
    return splits


def hf_splits(arg: str) -> list[str]:
    name, options = parse_hf(arg)
    return list(open_splits(name, options.get("config")))


def find_column(features: dict, wanted: str | None, kind, what: str, spec: str) -> str:
    """The column named ``wanted``, else the only column whose feature is a ``kind``."""
    if wanted:
        if wanted not in features:
            raise VTError(f"{spec}: no column '{wanted}'; columns: {', '.join(features)}")
        return wanted
    found = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(found) != 1:
        which = ", ".join(found) if found else "none"
        raise VTError(f"{spec}: cannot tell the {what} column ({which} found); name it with ?{what}=COLUMN")
    return found[0]


def load_split(name: str, options: dict[str, str], hf_split: str):
    """One split as a ``datasets.Dataset`` whose rows are its Arrow table's rows."""
    datasets = import_datasets()
    offline = offline_reason(datasets, name)
    try:
        if is_saved_to_disk(name):
            saved = datasets.load_from_disk(name)
            ds = saved[hf_split] if isinstance(saved, datasets.DatasetDict) else saved
        else:
            ds = datasets.load_dataset(name, options.get("config"), split=hf_split)
    except Exception as exc:  # as in open_splits
        raise open_failed(datasets, name, offline, f"load {name} split {hf_split}", exc) from None
    return ds.flatten_indices() if ds._indices is not None else ds


@register_dataset(HF, parse_arg=hf_arg, discover_splits=hf_splits)
def load_hf(req: DatasetRequest) -> HFImageSet:
    datasets = import_datasets()
    name, options = parse_hf(req.arg)
    splits = open_splits(name, options.get("config"))
    split = req.split
    if split not in splits and split in ALIASES.values():  # "validation" asked for, shown as "val"
        split = next(k for k, v in ALIASES.items() if v == split)
    check_split(req.spec, split, list(splits))
    ds = load_split(name, options, splits[split])
    image_column = find_column(ds.features, options.get("image"), datasets.Image, "image", req.spec)
    label_column = find_column(ds.features, options.get("label"), datasets.ClassLabel, "label", req.spec)
    feature = ds.features[label_column]
    values = ds.data.column(label_column).to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        class_names, labels = list(feature.names), values
        if any(v is None or v < 0 for v in values):
            raise layout_error(HF, f"{req.spec} split {split} has unlabelled rows")
    else:
        # Plain labels: classes from every split, so labels agree across splits.
        others = [load_split(name, options, s).data.column(label_column).to_pylist()
                  for k, s in splits.items() if k != split]
        class_names, labels = classes_from_values(values + [v for other in others for v in other])
        labels = labels[: len(values)]
    image_ids = [f"{splits[split]}/{i}" for i in range(len(ds))]
    root = name if Path(name).is_dir() else None
    return HFImageSet(req.spec, split, class_names, labels, image_ids, ds, image_column, root=root)
