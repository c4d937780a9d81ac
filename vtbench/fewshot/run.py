"""``run_fewshot``: episodes on cached features, one result record per (tokens, protocol, classifier).

Which images episodes draw from: every image of the chosen classes, pooled over
all extracted splits of the dataset (Meta-Dataset uses every image of a test
class); ``split=`` restricts the pool. Images present in two splits (``train``
and ``trainval``) enter once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vtbench.cache import CacheSet, check_compatible
from vtbench.device import resolve_device
from vtbench.errors import VTError
from vtbench.progress import Progress
from vtbench.protocols import fewshot_classifier
from vtbench.fewshot.classifiers import CLASSIFIERS, LR_HISTORY, LR_TOL, episode_accuracies
from vtbench.fewshot import episodes as episode_files
from vtbench.fewshot.episodes import EpisodeSet, episodes_from_ids, read_episodes
from vtbench.fewshot.samplers import FixedSampler, MetaDatasetSampler, eligible_classes, sample_episodes
from vtbench.fewshot.splits import SUBSETS, class_split, default_subset
from vtbench.paths import results_dir as default_results_dir
from vtbench import options
from vtbench.options import Opt
from vtbench.settings import SELECT_OPTIONS, SettingsQuery
from vtbench.tokens import TokenSpec, parse_spec
from vtbench.transfer.solver import CRITERION

SAMPLERS = ("md", "fixed")
PROGRESS_EVERY_S = 10.0  # long runs report progress at most this often
DEFAULT_EPISODES = 600
DEFAULT_QUERIES = 15

# `vt fewshot`'s options and a suite's fewshot keys.
FEWSHOT_OPTIONS = (
    options.MODEL,
    options.DATASET,
    Opt("tokens", str, ["cls[-1]"], "Token spec(s), e.g. 'cls[-4:]' 'cls[-1]+patch[-1]'.", short="-t", multiple=True),
    Opt("sampler", str, None, "md (default): Meta-Dataset variable-way variable-shot; fixed: --ways-way --shots-shot."),
    Opt("classifier", str, ["lr"], "lr (logistic regression) and/or ncc (nearest centroid, cosine).", multiple=True),
    Opt("episodes", str, str(DEFAULT_EPISODES), "Number of episodes, or an episodes file (from --save-episodes) to replay."),
    Opt("ways", int, None, "Ways of the fixed sampler (default 5)."),
    Opt("shots", int, None, "Shots of the fixed sampler; several values run several protocols (default 1 5).",
        multiple=True),
    Opt("queries", int, None, f"Queries per class of the fixed sampler (default {DEFAULT_QUERIES})."),
    Opt("classes", str, None, "Class split to draw from: test (default where defined), val, train or all."),
    Opt("split", str, None, "Only pool these extracted splits (default: all that are cached).", short="-s",
        multiple=True),
    Opt("seed", int, None, "Episode seed (default 0)."),
    Opt("seeds", int, None, "Several episode seeds, one result each: --seeds 0 1 2 (the leaderboard shows their mean "
        "± std).", multiple=True),
    Opt("l2_normalize", bool, True, "L2-normalise features first.", flag="--l2-normalize/--no-l2-normalize"),
    Opt("center", bool, False, "ncc: subtract the mean of the episode's support features.", flag="--center"),
    Opt("C", float, 1.0, "lr: inverse L2 strength as in scikit-learn (l2 = 1/(C*n_support)).", flag="--C"),
    Opt("save_episodes", Path, None, "Write the episodes (image ids) to this JSON file.", suite=False),
    options.CACHE_DIR,
    options.RESULTS_DIR,
    options.SKIP_EXISTING,
    options.DEVICE,
    options.WEIGHTS_PICK,
    *SELECT_OPTIONS,
    options.ROOT_PICK,
)


@dataclass
class Pool:
    """The images episodes draw from: rows of one or more caches, each image once."""

    caches: list  # FeatureCache, in split order
    rows: list[np.ndarray]  # per cache, the rows kept (an image already seen in an earlier split is dropped)
    image_ids: list[str]
    labels: np.ndarray  # indices into class_names
    class_names: list[str]  # sorted union over the caches
    _features: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return [c.meta["split"] for c in self.caches]

    def features(self, spec: TokenSpec) -> np.ndarray:
        """Pool features for a token spec, (N, D) float32."""
        key = str(spec)
        if key not in self._features:
            self._features = {key: np.concatenate([c.features(spec)[r] for c, r in zip(self.caches, self.rows)])}
        return self._features[key]

    def close(self) -> None:
        for cache in self.caches:
            cache.close()


def open_pool(caches: CacheSet, splits: Sequence[str] | None) -> Pool:
    """Open the caches of ``splits`` (default: every split of the dataset that has a matching cache)."""
    if not splits:
        splits = caches.present()
        if not splits:
            from vtbench.data import dataset_info
            from vtbench.paths import cache_dir

            test = dataset_info(caches.dataset).test_split or "test"
            raise VTError(
                f"no cache for {caches.model} on {caches.dataset} under {cache_dir(caches.cache_dir)}; make it with: "
                f"vt extract --model {caches.model} --dataset {caches.dataset} --split {test}"
            )
    opened = [caches.get(s) for s in dict.fromkeys(splits)]
    check_compatible(caches.opened)  # splits may hold different classes: the pool takes their union
    class_names = sorted({name for c in opened for name in c.class_names})
    label_of = {name: i for i, name in enumerate(class_names)}
    seen: set[str] = set()
    rows, image_ids, labels = [], [], []
    for cache in opened:
        ids = cache.image_ids
        keep = np.array([i for i, image_id in enumerate(ids) if image_id not in seen], dtype=np.int64)
        seen.update(ids)
        remap = np.array([label_of[name] for name in cache.class_names], dtype=np.int64)
        rows.append(keep)
        image_ids.extend(ids[i] for i in keep)
        labels.append(remap[cache.labels[keep]])
    return Pool(opened, rows, image_ids, np.concatenate(labels), class_names)


def _as_list(value) -> list:
    return [value] if isinstance(value, (str, int, TokenSpec)) else list(value)


def _variant(classifier: str, *, l2_normalize, center, C, extras: list[str]) -> str:
    """Classifier plus every option that changes the number, e.g. ``ncc+center``, ``lr+C0.1+300ep``."""
    parts = fewshot_classifier(classifier, C=C, center=center).variant_parts()
    if not l2_normalize:
        parts.append("nol2")
    return "+".join(parts + extras)


def run_fewshot(
    model: str,
    dataset: str,
    tokens: str | Sequence[str] = "cls[-1]",
    sampler: str | None = None,
    *,
    classifier: str | Sequence[str] = "lr",
    episodes: int | str | os.PathLike = DEFAULT_EPISODES,
    ways: int | None = None,
    shots: int | Sequence[int] | None = None,
    queries: int | None = None,
    classes: str | None = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    split: str | Sequence[str] | None = None,
    l2_normalize: bool = True,
    center: bool = False,
    C: float = 1.0,
    save_episodes: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
    skip_existing: bool = False,
    save: bool = True,
    device: str = "auto",
    weights: str | None = None,
    settings: SettingsQuery | dict | None = None,
    data_root: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    **select,
) -> list[dict]:
    """Few-shot episodes on cached features; returns one record per (tokens, protocol, classifier, seed).

    ``sampler`` is ``md`` (Meta-Dataset variable-way variable-shot, the default) or
    ``fixed`` (``ways``-way, default 5; one run per entry of ``shots``, default 1 and 5;
    ``queries`` per class, default 15). ``episodes`` is a count (drawn with ``seed``,
    default 0) or an episodes file to replay, which fixes the sampler, classes and
    seed itself (passing any of them too is an error). ``classes`` picks the class
    split (``test`` by default where one is defined, else ``all``). Records are saved
    to the results store unless ``save=False``; with ``skip_existing`` a stored
    record is returned (marked ``"skipped": True``) instead of being recomputed. ``seeds`` draws
    one episode set per seed (each its own record); ``data_root`` narrows the caches to those
    extracted from that dataset root.
    """
    if seeds is not None:  # one run per seed, with every other argument as given
        return _each_seed(dict(locals()))
    from vtbench import results as store
    from vtbench.allocator import keep_freed_memory
    from vtbench.data import canonical_spec, dataset_info

    keep_freed_memory()  # as vt does: batched solves reuse large blocks

    t0 = time.perf_counter()
    specs = [parse_spec(t) for t in _as_list(tokens)]
    check_fewshot_options(sampler=sampler, classifier=classifier, episodes=episodes, ways=ways, shots=shots,
                          queries=queries, classes=classes, seed=seed, center=center, C=C)
    sampler, ways, shots, queries, seed = _sampling_defaults(sampler, ways, shots, queries, seed)
    classifiers = _as_list(classifier)
    device_used = str(resolve_device(device))
    info = dataset_info(dataset)
    dataset = canonical_spec(dataset)
    episodes = _episode_count(episodes)
    episode_file = None if isinstance(episodes, (int, np.integer)) else Path(episodes)
    splits = _as_list(split) if split else None
    query = SettingsQuery.of(settings, **select)
    if save:
        from vtbench.paths import writable_dir

        writable_dir(default_results_dir(results_dir), "--results")

    pool = open_pool(CacheSet(model, dataset, cache_dir=cache_dir, weights=weights, settings=query,
                              data_root=data_root), splits)
    try:
        t_open = time.perf_counter()
        if episode_file is not None:
            sets, class_info, source, extras = _replay(episode_file, dataset, pool)
        else:
            subset = classes or default_subset(info.name)
            sets, class_info = _sample(info.name, pool, subset, _samplers(sampler, ways, shots, queries),
                                       int(episodes), seed)
            source = {"seed": seed, "episodes": int(episodes)}
            extras = [f"{episodes}ep"] if episodes != DEFAULT_EPISODES else []
            if classes is not None or subset != default_subset(info.name):
                # named whenever asked for, so that one option gives one label on every dataset
                extras.append(f"classes-{subset}")
            if sampler == "fixed" and queries != DEFAULT_QUERIES:
                extras.append(f"q{queries}")
            if save_episodes:
                episode_files.save_episodes(save_episodes, sets, dataset=dataset, splits=pool.splits,
                                            classes=class_info, image_ids=pool.image_ids, class_names=pool.class_names)
        if splits:
            extras.append("splits-" + "-".join(pool.splits))
        t_episodes = time.perf_counter()

        ref = pool.caches[0].meta
        cache_refs = {"episodes": [c.record_ref() for c in pool.caches]}  # which images: part of the identity
        results_root = default_results_dir(results_dir)
        lib_versions = store.versions()
        records = []
        progress = Progress(log or (lambda msg: None), len(specs) * len(sets) * len(classifiers), "result",
                            PROGRESS_EVERY_S)
        for spec in specs:
            for episode_set in sets:
                for name in classifiers:
                    record = store.new_record(
                        "fewshot", ref, protocol=episode_set.sampler.protocol, seed=episode_set.seed, caches=cache_refs,
                        variant=_variant(name, l2_normalize=l2_normalize, center=center, C=C, extras=extras),
                        tokens=str(spec))
                    stored = store.stored_record(results_root, record) if skip_existing else None
                    if stored is not None:
                        records.append(stored)
                        continue
                    t_solve = time.perf_counter()
                    scores = episode_accuracies(
                        pool.features(spec), episode_set.episodes, name,
                        l2_normalize=l2_normalize, center=center, C=C, device=device_used,
                    )
                    record.update(_details(scores, episode_set, pool, name, l2_normalize, center, C,
                                           class_info, source, device_used))
                    record["timings"] = {"open_s": t_open - t0, "episodes_s": t_episodes - t_open,
                                         "solve_s": time.perf_counter() - t_solve}
                    record["versions"] = lib_versions
                    if save:
                        record["_path"] = str(store.save(results_root, record))
                    records.append(record)
                    progress.step(f"{spec} {episode_set.sampler.protocol}/{name}")
        return records
    finally:
        pool.close()


def _each_seed(arguments: dict) -> list[dict]:
    """run_fewshot once per seed of ``arguments['seeds']``."""
    from vtbench.transfer.probe import check_seeds

    seeds = arguments.pop("seeds")
    select = arguments.pop("select")
    if arguments.pop("seed") is not None:
        raise VTError("pass --seed or --seeds, not both")
    return [rec for s in check_seeds(seeds) for rec in run_fewshot(**arguments, **select, seed=s)]


def _replay(episode_file: Path, dataset: str, pool: Pool) -> tuple[list[EpisodeSet], dict, dict, list[str]]:
    """Episode sets of a file, mapped onto the pool; the variant names the file by its sha256."""
    doc, sha = read_episodes(episode_file)
    if doc.get("dataset") != dataset:
        raise VTError(f"episodes file {episode_file} is for dataset '{doc.get('dataset')}', not '{dataset}'")
    sets = episodes_from_ids(doc, pool.image_ids, pool.labels, pool.class_names)
    if not sets or not all(s.episodes for s in sets):
        raise VTError(f"episodes file {episode_file} holds no episodes")
    return sets, doc.get("classes", {}), {"file": str(episode_file), "sha256": sha}, [f"file-{sha[:8]}"]


def _sample(dataset_name: str, pool: Pool, subset: str, samplers: list, num_episodes: int, seed: int):
    """One seeded episode set per sampler over the classes of ``subset``; classes too small are left out."""
    chosen, class_info = class_split(dataset_name, pool.class_names, subset)
    chosen_labels = [pool.class_names.index(n) for n in chosen]
    sets, excluded = [], {}
    for s in samplers:
        usable, too_small = eligible_classes(pool.labels, chosen_labels, s)
        if len(usable) < s.min_classes and len(chosen) < len(pool.class_names):
            # Say that the class split, not the data, is what runs short (a small copy of a dataset, say).
            raise VTError(
                f"the '{s.name}' sampler needs at least {s.min_classes} classes with >= {s.min_images_per_class} "
                f"images each; {dataset_name}'s {class_info['subset']} classes give {len(usable)} of {len(chosen)} "
                f"(its {len(pool.class_names)} classes split {'/'.join(map(str, class_info['sizes']))} "
                f"train/val/test); pass --classes all to draw from every class")
        if too_small:
            excluded[s.protocol] = [pool.class_names[c] for c in too_small]
        sets.append(EpisodeSet(s, seed, sample_episodes(pool.labels, usable, s, num_episodes, seed)))
    if excluded:
        class_info = dict(class_info, excluded_too_few_images=excluded)
    return sets, class_info


def check_fewshot_options(*, sampler: str | None = None, classifier: str | Sequence[str] = "lr",
                          episodes: int | str | os.PathLike = DEFAULT_EPISODES, ways: int | None = None,
                          shots: int | Sequence[int] | None = None, queries: int | None = None,
                          classes: str | None = None, seed: int | None = None, center: bool = False,
                          C: float = 1.0) -> None:
    """Raise VTError for any option ``run_fewshot`` would refuse, before any cache is read (suites check theirs
    with it when they load). ``None`` stands for an option left at its default."""
    classifiers = _as_list(classifier)
    for name in classifiers:
        if name not in CLASSIFIERS:
            raise VTError(f"unknown classifier '{name}'; use one of {', '.join(CLASSIFIERS)}")
    if center and "ncc" not in classifiers:
        raise VTError("--center applies to the ncc classifier only")
    if C <= 0:
        raise VTError(f"C must be positive, got {C}")
    if classes is not None and classes not in SUBSETS:
        raise VTError(f"unknown --classes '{classes}'; use one of {', '.join(SUBSETS)}")
    count = _episode_count(episodes)
    if isinstance(count, (int, np.integer)):
        if count < 1:
            raise VTError(f"--episodes must be at least 1, got {count}")
        unused = [f"--{name}" for name, value in (("ways", ways), ("shots", shots), ("queries", queries))
                  if value is not None]
        if unused and sampler in (None, "md"):  # md draws its own ways, shots and queries: they would be ignored
            raise VTError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to the fixed sampler only; "
                          f"add --sampler fixed (md draws ways, shots and queries per episode)")
        _samplers(*_sampling_defaults(sampler, ways, shots, queries, seed)[:4])
        return
    if not Path(count).is_file():
        raise VTError(f"--episodes {count}: not a count, and no such episodes file")
    given = [f"--{name}" for name, value in (("sampler", sampler), ("ways", ways), ("shots", shots),
                                             ("queries", queries), ("classes", classes), ("seed", seed))
             if value is not None]
    if given:  # they would be ignored: the file's episodes are replayed as they are
        raise VTError(f"--episodes {count} replays that file's episodes, which fix the sampler, classes and "
                      f"seed; drop {', '.join(given)}")


def protocols_for(sampler: str | None = None, ways: int | None = None, shots=None, queries: int | None = None) -> list[str]:
    """The protocol names ``run_fewshot`` records for these sampling options (``None``: the default)."""
    return [s.protocol for s in _samplers(*_sampling_defaults(sampler, ways, shots, queries, None)[:4])]


def _sampling_defaults(sampler, ways, shots, queries, seed) -> tuple:
    """The sampling options with ``None`` replaced by their defaults (md; fixed 5-way 1 and 5 shots, 15
    queries; seed 0)."""
    return ("md" if sampler is None else sampler, 5 if ways is None else ways,
            (1, 5) if shots is None else shots, DEFAULT_QUERIES if queries is None else queries,
            0 if seed is None else seed)


def _episode_count(episodes):
    """An episode count as an int (also from a string of digits), else the episodes file as given."""
    if isinstance(episodes, str) and episodes.strip().lstrip("-").isdigit():
        return int(episodes)
    return episodes


def _samplers(sampler: str, ways: int, shots, queries: int) -> list:
    if sampler == "md":
        return [MetaDatasetSampler()]
    if sampler == "fixed":
        shots = sorted(set(int(s) for s in _as_list(shots)))
        if not shots:
            raise VTError("--shots needs at least one value for the fixed sampler")
        return [FixedSampler(ways, k, queries) for k in shots]
    raise VTError(f"unknown sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")


def _details(scores, episode_set, pool, classifier, l2_normalize, center, C, class_info, source, device) -> dict:
    """Metrics and provenance of one result record."""
    eps = episode_set.episodes
    accs = scores.accuracy
    mean, ci95, std = confidence_interval(accs)
    clf = {"name": classifier, "l2_normalize": l2_normalize}
    if classifier == "lr":
        clf.update(C=C, l2="1/(C*n_support)", objective="mean cross-entropy + l2/2 ||W||^2, bias unpenalised",
                   solver=f"vtbench.transfer.solver.fit_logreg (batched L-BFGS, {LR_HISTORY} pairs; episodes with "
                          "s < d solved exactly in their s-dim kernel basis)",
                   tol=LR_TOL, criterion=CRITERION,
                   converged_fraction=float(scores.converged.mean()),
                   mean_iterations=float(scores.iterations.mean()))
    else:
        clf.update(center=center, similarity="cosine to class centroids",
                   centering="mean of the episode's support features" if center else None)
    return {
        "metrics": {"accuracy": mean, "ci95": ci95, "std": std, "episodes": len(eps)},
        "episode_accuracies": [round(float(a) * 100, 4) for a in accs],
        "splits": {"episodes": pool.splits},
        "fewshot": {
            "sampler": episode_set.sampler.params(),
            "classifier": clf,
            "classes": class_info,
            "episodes_source": source,
            "pool_images": len(pool.image_ids),
            "mean_ways": float(np.mean([e.ways for e in eps])),
            "mean_support": float(np.mean([len(e.support) for e in eps])),
            "mean_query": float(np.mean([len(e.query) for e in eps])),
            "device": device,
        },
    }


def confidence_interval(accuracies) -> tuple[float, float, float]:
    """Mean, 95% half-width (1.96 * std / sqrt(n), numpy std with ddof 0) and std, all in percent."""
    accs = np.asarray(accuracies, dtype=np.float64) * 100
    std = float(accs.std())
    return float(accs.mean()), 1.96 * std / float(np.sqrt(len(accs))), std
