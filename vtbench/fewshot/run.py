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
from vtbench.fewshot.classifiers import CLASSIFIERS
from vtbench.fewshot import episodes as episode_files
from vtbench.fewshot.episodes import EpisodeSet, episodes_from_ids, read_episodes
from vtbench.fewshot.samplers import FixedSampler, MetaDatasetSampler, eligible_classes, sample_episodes
from vtbench.fewshot.splits import SUBSETS, class_split, default_subset
from vtbench.paths import results_dir as default_results_dir
from vtbench import options
from vtbench.options import Opt
from vtbench.settings import SELECT_OPTIONS, SettingsQuery
from vtbench.tokens import TokenSpec, parse_spec

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


def _variant(classifier, l2_normalize: bool, extras: list[str]) -> str:
    """Classifier plus every option that changes the number, e.g. ``ncc+center``, ``lr+C0.1+300ep``."""
    return "+".join(classifier.variant_parts() + ([] if l2_normalize else ["nol2"]) + extras)


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
    from vtbench.allocator import keep_freed_memory

    keep_freed_memory()  # as vt does: batched solves reuse large blocks
    t0 = time.perf_counter()
    plan = _plan(dataset, tokens, sampler, classifier, episodes, ways, shots, queries, classes, seed, split,
                 l2_normalize, center, C, device)
    results_root = _results_root(results_dir, save)
    pool = open_pool(CacheSet(model, plan.dataset, cache_dir=cache_dir, weights=weights,
                              settings=SettingsQuery.of(settings, **select), data_root=data_root), plan.splits)
    try:
        t_open = time.perf_counter()
        drawn = _draw_episodes(plan, pool, save_episodes)
        timings = {"open_s": t_open - t0, "episodes_s": time.perf_counter() - t_open}
        return _run_and_record(plan, pool, drawn, results_root, skip_existing=skip_existing, save=save,
                               timings=timings, say=log or (lambda msg: None))
    finally:
        pool.close()


@dataclass
class _Plan:
    """What one run_fewshot call does, its options checked and defaulted."""

    info: object  # the dataset's DatasetInfo
    dataset: str  # canonical spec
    specs: list[TokenSpec]
    classifiers: list  # vtbench.protocols.FewshotClassifier
    sampler: str
    ways: int
    shots: list[int]
    queries: int
    seed: int
    episodes: int | Path  # a count, or an episodes file to replay
    classes: str | None
    splits: list[str] | None
    l2_normalize: bool
    device: str


def _plan(dataset, tokens, sampler, classifier, episodes, ways, shots, queries, classes, seed, split, l2_normalize,
          center, C, device) -> _Plan:
    from vtbench.data import canonical_spec, dataset_info

    specs = [parse_spec(t) for t in _as_list(tokens)]
    check_fewshot_options(sampler=sampler, classifier=classifier, episodes=episodes, ways=ways, shots=shots,
                          queries=queries, classes=classes, seed=seed, center=center, C=C)
    sampler, ways, shots, queries, seed = _sampling_defaults(sampler, ways, shots, queries, seed)
    count = _episode_count(episodes)
    return _Plan(dataset_info(dataset), canonical_spec(dataset), specs,
                 [fewshot_classifier(name, C=C, center=center) for name in _as_list(classifier)],
                 sampler, ways, shots, queries, seed,
                 count if isinstance(count, (int, np.integer)) else Path(count), classes,
                 _as_list(split) if split else None, l2_normalize, str(resolve_device(device)))


def _results_root(results_dir, save: bool) -> Path:
    root = default_results_dir(results_dir)
    if save:
        from vtbench.paths import writable_dir

        writable_dir(root, "--results")
    return root


@dataclass
class _Drawn:
    """The episode sets of a run, with what the records say of them."""

    sets: list[EpisodeSet]
    class_info: dict
    source: dict  # the seed and count, or the file replayed
    extras: list[str]  # variant parts naming the episodes' options


def _draw_episodes(plan: _Plan, pool: Pool, save_episodes) -> _Drawn:
    """Replay the episodes file, or draw seeded episode sets (and save them where asked)."""
    if isinstance(plan.episodes, Path):
        sets, class_info, source, extras = _replay(plan.episodes, plan.dataset, pool)
    else:
        name = plan.info.name
        subset = plan.classes or default_subset(name)
        sets, class_info = _sample(name, pool, subset, _samplers(plan.sampler, plan.ways, plan.shots, plan.queries),
                                   int(plan.episodes), plan.seed)
        source = {"seed": plan.seed, "episodes": int(plan.episodes)}
        extras = [f"{plan.episodes}ep"] if plan.episodes != DEFAULT_EPISODES else []
        if plan.classes is not None or subset != default_subset(name):
            # named whenever asked for, so that one option gives one label on every dataset
            extras.append(f"classes-{subset}")
        if plan.sampler == "fixed" and plan.queries != DEFAULT_QUERIES:
            extras.append(f"q{plan.queries}")
        if save_episodes:
            episode_files.save_episodes(save_episodes, sets, dataset=plan.dataset, splits=pool.splits,
                                        classes=class_info, image_ids=pool.image_ids, class_names=pool.class_names)
    if plan.splits:
        extras.append("splits-" + "-".join(pool.splits))
    return _Drawn(sets, class_info, source, extras)


def _run_and_record(plan: _Plan, pool: Pool, drawn: _Drawn, results_root: Path, *, skip_existing: bool, save: bool,
                    timings: dict, say) -> list[dict]:
    """One record per (spec, episode set, classifier): stored ones returned as they are (marked ``skipped``),
    the others scored and saved."""
    from vtbench import results as store

    cache_refs = {"episodes": [c.record_ref() for c in pool.caches]}  # which images: part of the identity
    lib_versions = store.versions()
    records = []
    progress = Progress(say, len(plan.specs) * len(drawn.sets) * len(plan.classifiers), "result", PROGRESS_EVERY_S)
    for spec in plan.specs:
        for episode_set in drawn.sets:
            for clf in plan.classifiers:
                record = store.new_record(
                    "fewshot", pool.caches[0].meta, protocol=episode_set.sampler.protocol, seed=episode_set.seed,
                    caches=cache_refs, variant=_variant(clf, plan.l2_normalize, drawn.extras), tokens=str(spec))
                stored = store.stored_record(results_root, record) if skip_existing else None
                if stored is not None:
                    records.append(stored)
                    continue
                t_solve = time.perf_counter()
                scores = clf.score(pool.features(spec), episode_set.episodes, l2_normalize=plan.l2_normalize,
                                   device=plan.device)
                record.update(_details(scores, episode_set, pool, clf, plan, drawn))
                record["timings"] = dict(timings, solve_s=time.perf_counter() - t_solve)
                record["versions"] = lib_versions
                if save:
                    record["_path"] = str(store.save(results_root, record))
                records.append(record)
                progress.step(f"{spec} {episode_set.sampler.protocol}/{clf.name}")
    return records


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


def _details(scores, episode_set, pool, classifier, plan: _Plan, drawn: _Drawn) -> dict:
    """Metrics and provenance of one result record."""
    eps = episode_set.episodes
    accs = scores.accuracy
    mean, ci95, std = confidence_interval(accs)
    clf = {"name": classifier.name, "l2_normalize": plan.l2_normalize, **classifier.get_params(),
           **classifier.describe_run(scores)}
    return {
        "metrics": {"accuracy": mean, "ci95": ci95, "std": std, "episodes": len(eps)},
        "episode_accuracies": [round(float(a) * 100, 4) for a in accs],
        "splits": {"episodes": pool.splits},
        "fewshot": {
            "sampler": episode_set.sampler.params(),
            "classifier": clf,
            "classes": drawn.class_info,
            "episodes_source": drawn.source,
            "pool_images": len(pool.image_ids),
            "mean_ways": float(np.mean([e.ways for e in eps])),
            "mean_support": float(np.mean([len(e.support) for e in eps])),
            "mean_query": float(np.mean([len(e.query) for e in eps])),
            "device": plan.device,
        },
    }


def confidence_interval(accuracies) -> tuple[float, float, float]:
    """Mean, 95% half-width (1.96 * std / sqrt(n), numpy std with ddof 0) and std, all in percent."""
    accs = np.asarray(accuracies, dtype=np.float64) * 100
    std = float(accs.std())
    return float(accs.mean()), 1.96 * std / float(np.sqrt(len(accs))), std
