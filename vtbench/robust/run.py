"""`vt robust`: the papers' robustness analyses on cached features (docs/robustness.md).

- :func:`run_accuracy`: a probe fitted on the clean train features, scored on the clean test features and
  on every perturbed test cache of the same model, settings and images (one fit, one matrix product per
  test set); random perturbations' trials give a mean and a spread. Lesion caches give the lesion study.
- :func:`run_stability`: per block and token kind, the mean over images of the Pearson correlation (and the
  cosine) between a clean feature and its perturbed feature.
- :func:`run_cka`: linear CKA between every pair of blocks (biased and debiased), streamed over row chunks.

Nothing is extracted here: a missing cache is an error naming the `vt extract` command that makes it.
Every number is saved to the results store with its provenance.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import numpy as np

from vtbench import options
from vtbench.cache import CacheSet, list_caches, open_cache
from vtbench.errors import VTError
from vtbench.options import Opt
from vtbench.perturb.spec import agrees, label, parse, sort_key
from vtbench.settings import SELECT_OPTIONS, FeatureSettings, SettingsQuery

CHUNK_ROWS = 4096  # rows per streamed chunk (CKA, stability)

_PICK = tuple(o for o in SELECT_OPTIONS if o.name != "perturb")  # the clean caches' settings
_PERTURB_FILTER = Opt("perturb", str, None, "Only the perturbed caches of these specs (repeatable; default: every "
                      "perturbed cache of the clean caches' settings and images).", multiple=True, suite=False)
_KINDS = Opt("kinds", str, None, "Only perturbations of these kinds: patchdrop, shuffle, lesion, tokendrop.",
             multiple=True)
_COMMON = (options.CACHE_DIR, options.RESULTS_DIR, options.WEIGHTS_PICK, *_PICK, options.ROOT_PICK)

# A suite's robust: section (its models' own caches, settings and outputs come from the suite).
SUITE_ROBUST_OPTIONS = (
    Opt("perturb", str, None, "Perturbations of the test split (lists and ranges allowed: patchdrop:random:0.25,0.5); "
        "extracted for the models with robust: true (the default), then scored.", multiple=True),
    Opt("protocol", str, ["default"], "Probe protocol(s) fitted on the clean features.", multiple=True),
    Opt("tokens", str, None, "Token specs (default: each model's first).", multiple=True),
    Opt("head", bool, False, "Also score each model's own ImageNet head (protocol head on --tokens logits; extract "
        "with logits: true) on the datasets whose classes are ImageNet synsets."),
    Opt("stability", bool, False, "Also the per-block feature stability of every perturbation."),
    Opt("cka", str, None, "Token kinds whose block x block CKA is computed (e.g. [cls, stage]).", multiple=True),
)

# `vt robust accuracy|stability|cka` options.
ACCURACY_OPTIONS = (
    options.MODEL, options.DATASET,
    Opt("tokens", str, ["cls[-1]"], "Token spec(s) of the probe.", short="-t", multiple=True),
    Opt("protocol", str, ["default"], "Probe protocol(s) fitted on the clean features: default, sklearn, knn, ncc.",
        short="-p", multiple=True),
    _PERTURB_FILTER, _KINDS,
    Opt("seed", int, 0, "Seed of the held-out validation split."),
    options.SKIP_EXISTING, options.DEVICE, *_COMMON,
)
STABILITY_OPTIONS = (
    options.MODEL, options.DATASET,
    Opt("split", str, None, "Split whose clean and perturbed features are compared (default: the test split)."),
    _PERTURB_FILTER, _KINDS, *_COMMON,
)
CKA_OPTIONS = (
    options.MODEL, options.DATASET,
    Opt("kinds", str, None, "Token kinds (cls, patch, stage; default: all but prelogits).", multiple=True),
    Opt("split", str, None, "Split whose features are compared (default: the test split)."),
    Opt("other_model", str, None, "Compare with this model's blocks (ViT blocks against CNN stages, say)."),
    Opt("other_weights", str, None, "--weights filter of --other-model's caches."),
    Opt("other_kind", str, None, "Token kind of --other-model (default: the same kind, else its first)."),
    *_COMMON,
)


def _group_key(p: dict) -> str:
    """A perturbation without its trial: the trials of one random perturbation form one result."""
    return json.dumps({k: v for k, v in p.items() if k != "trial"}, sort_keys=True)


def perturbed_caches(clean, split: str, cache_dir=None, specs: Sequence[str] | None = None,
                     kinds: Sequence[str] | None = None) -> dict[str, list]:
    """``{group: [(path, meta), ...]}``: the perturbed caches of ``split`` made with the clean cache's model,
    weights, settings and images, grouped by perturbation (trials together), narrowed by ``specs`` / ``kinds``."""
    from vtbench.paths import cache_dir as default_cache_dir

    ref = clean.meta
    same = FeatureSettings.of(ref)
    wanted = [w for spec in specs or [] for w in parse(spec, query=True)]
    groups: dict[str, list] = {}
    for path, meta in list_caches(default_cache_dir(cache_dir)):
        p = meta.get("perturbation")
        if not p or meta.get("model") != ref["model"] or meta.get("dataset") != ref["dataset"]:
            continue
        if meta.get("split") != split or meta.get("weights_sha256") != ref["weights_sha256"]:
            continue
        if meta.get("data_fingerprint") != ref.get("data_fingerprint"):
            continue
        s = FeatureSettings.of(meta)
        if (s.transform, s.norm, s.dtype, s.precision) != (same.transform, same.norm, same.dtype, same.precision):
            continue
        if kinds and p["kind"] not in kinds:
            continue
        if wanted and not any(agrees(w, p) for w in wanted):
            continue
        groups.setdefault(_group_key(p), []).append((path, meta))
    for members in groups.values():
        members.sort(key=lambda pm: pm[1]["perturbation"].get("trial", 0))
    return dict(sorted(groups.items(), key=lambda item: sort_key(json.loads(item[0]))))


def _clean_caches(model, dataset, cache_dir, weights, settings, data_root, select: dict, kinds=()) -> CacheSet:
    """The clean caches an analysis compares against: the settings given, but never a perturbation (the
    perturbed test sets are found beside them, by :func:`perturbed_caches`)."""
    query = SettingsQuery.of(settings, **{k: v for k, v in select.items() if k != "perturb"})
    return CacheSet(model, dataset, cache_dir=cache_dir, weights=weights, settings=query, data_root=data_root,
                    kinds=kinds)


def _missing(clean, split, specs, kinds) -> VTError:
    ref = clean.meta
    what = " --perturb ".join(specs or []) or "patchdrop:random:0.5"
    return VTError(f"no perturbed {split} caches of {ref['model']} on {ref['dataset']} with the clean caches' "
                   f"settings{' (' + ', '.join(kinds) + ')' if kinds else ''}; make them with: vt extract --model "
                   f"{ref['model']} --dataset {ref['dataset']} --split {split} --perturb {what} (and the options the "
                   "clean caches were extracted with)")


def run_accuracy(
    model: str,
    dataset: str,
    tokens: str | Sequence[str] = "cls[-1]",
    protocol: str | Sequence[str] = "default",
    *,
    perturb: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
    cache_dir=None,
    results_dir=None,
    weights: str | None = None,
    settings: SettingsQuery | dict | None = None,
    data_root=None,
    skip_existing: bool = False,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    **select,
) -> list[dict]:
    """Accuracy under perturbation: one record per (perturbation, token spec, protocol), clean included.

    ``perturb`` specs and ``kinds`` (patchdrop, shuffle, lesion, tokendrop) narrow the perturbed test caches
    (default: every one there is). Each record's ``metrics`` hold ``top1`` (the mean over trials), its
    ``top1_std`` and ``top1_trials``, ``clean_top1`` and ``relative`` (top1 / clean top1).
    """
    from vtbench import results as store
    from vtbench.data import dataset_info
    from vtbench.device import resolve_device
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.paths import writable_dir
    from vtbench.tokens import parse_spec
    from vtbench.transfer.metrics import classification_metrics
    from vtbench.transfer.probe import Task, _final_specs, _hold_out, _open_splits, check_probe_options, make_protocol

    say = log or (lambda msg: None)
    protocols = [make_protocol(name) for name in check_probe_options(protocol=protocol)]
    specs = [parse_spec(t) for t in ([tokens] if isinstance(tokens, str) else list(tokens))]
    dev = resolve_device(device)
    info = dataset_info(dataset)
    results_root = writable_dir(default_results_dir(results_dir), "--results")
    caches = _clean_caches(model, dataset, cache_dir, weights, settings, data_root, select,
                           kinds=set().union(*(s.kinds for s in specs)))
    try:
        plans = _open_splits(caches, protocols, info)
        specs = _final_specs(caches, specs, per_block=False)
        test = caches.get(info.test_split)
        groups = perturbed_caches(test, info.test_split, cache_dir, perturb, kinds)
        if not groups:
            raise _missing(test, info.test_split, perturb, kinds)
        opened = {key: [open_cache(path) for path, _ in members] for key, members in groups.items()}
        records = []
        try:
            for proto, splits in _hold_out(caches, plans, info, seed).items():
                train, val, test_split = splits
                task = Task(specs, train, val, test_split, len(caches.reference.class_names), seed, dev,
                            getattr(proto, "standardize", True), say)
                base = _record_base(caches, proto, splits, seed)
                for spec in specs:
                    t0 = time.perf_counter()
                    fitted = proto.fit(task, spec)
                    t_fit = time.perf_counter() - t0
                    clean = classification_metrics(fitted.predict(test_split.features(spec)).cpu(),
                                                   fitted.labels(test_split.labels))
                    say(f"{proto.name} {spec}: clean top-1 {clean['top1']:.2f}; scoring {len(opened)} perturbations")
                    records.append(_save(store, results_root, skip_existing, dict(
                        base, **FeatureSettings.of(test.meta).fields(), tokens=str(spec), metrics=_metrics([clean], clean),
                        fit=fitted.outcome, timings={"fit_s": t_fit})))
                    for key, members in opened.items():
                        t0 = time.perf_counter()
                        per_trial = [classification_metrics(fitted.predict(c.features(spec)).cpu(), fitted.labels(c.labels))
                                     for c in members]
                        group = dict(json.loads(key), trials=len(members))
                        refs = dict(base["caches"], test=[c.record_ref() for c in members])
                        records.append(_save(store, results_root, skip_existing, {
                            **base, **FeatureSettings.of(members[0].meta).fields(), "perturbation": group,
                            "caches": refs, "tokens": str(spec), "metrics": _metrics(per_trial, clean),
                            "fit": fitted.outcome, "timings": {"fit_s": t_fit, "score_s": time.perf_counter() - t0}}))
        finally:
            for members in opened.values():
                for c in members:
                    c.close()
        return records
    finally:
        caches.close()


def _metrics(per_trial: list[dict], clean: dict) -> dict:
    top1 = [m["top1"] for m in per_trial]
    out = {k: float(np.mean([m[k] for m in per_trial])) for k in ("top1", "top5", "mean_per_class")}
    out.update(top1_std=float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0, top1_trials=top1,
               clean_top1=clean["top1"], relative=out["top1"] / clean["top1"] if clean["top1"] else 0.0)
    return out


def _record_base(caches, proto, splits, seed) -> dict:
    from vtbench.transfer.probe import _record_base as probe_base

    base = probe_base(caches, proto, splits, seed)
    base["task"] = "robust"
    return base


def _save(store, root, skip_existing: bool, record: dict) -> dict:
    stored = store.stored_record(root, record) if skip_existing else None
    if stored is not None:
        return stored
    record["_path"] = str(store.save(root, record))
    return record


# ------------------------------------------------------------------------------------------ stability


def _rows_by_id(cache) -> dict[str, int]:
    return {image_id: row for row, image_id in enumerate(cache.image_ids)}


def run_stability(
    model: str,
    dataset: str,
    *,
    split: str | None = None,
    perturb: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    cache_dir=None,
    results_dir=None,
    weights: str | None = None,
    settings: SettingsQuery | dict | None = None,
    data_root=None,
    log: Callable[[str], None] | None = None,
    **select,
) -> list[dict]:
    """Feature stability: per perturbation and token kind, the mean over images of the Pearson correlation
    (and the cosine) between each block's clean and perturbed feature; one record per (perturbation, kind)."""
    from vtbench import results as store
    from vtbench.data import dataset_info
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.paths import writable_dir

    say = log or (lambda msg: None)
    split = split or dataset_info(dataset).test_split
    results_root = writable_dir(default_results_dir(results_dir), "--results")
    caches = _clean_caches(model, dataset, cache_dir, weights, settings, data_root, select)
    try:
        clean = caches.get(split)
        groups = perturbed_caches(clean, split, cache_dir, perturb, kinds)
        if not groups:
            raise _missing(clean, split, perturb, kinds)
        records = []
        for key, members in groups.items():
            opened = [open_cache(path) for path, _ in members]
            try:
                for kind in [k for k in clean.kinds if k not in ("prelogits", "logits")]:
                    pearson, cosine = _stability(clean, opened, kind)
                    group = dict(json.loads(key), trials=len(opened))
                    say(f"{label(group)} {kind}: Pearson by block " + " ".join(f"{v:.2f}" for v in pearson))
                    record = store.new_record(
                        "stability", opened[0].meta, protocol="pearson", variant="", seed=0,
                        caches={"clean": [clean.record_ref()], "perturbed": [c.record_ref() for c in opened]},
                        tokens=kind)
                    record.update(perturbation=group, splits={"compared": [split]},
                                  metrics={"pearson": pearson[-1], "cosine": cosine[-1]},
                                  per_block={"pearson": pearson, "cosine": cosine},
                                  measure="mean over images of the Pearson correlation (and the cosine) between a "
                                          "block's clean and perturbed feature of the same image; trials averaged")
                    record["_path"] = str(store.save(results_root, record))
                    records.append(record)
            finally:
                for c in opened:
                    c.close()
        return records
    finally:
        caches.close()


def _stability(clean, perturbed: list, kind: str) -> tuple[list[float], list[float]]:
    rows = _rows_by_id(clean)
    pearson, cosine = [], []
    for block in range(clean.kinds[kind]):
        a_all = clean.block(kind, block, np.float64)
        p_trials, c_trials = [], []
        for cache in perturbed:
            order = np.array([rows[i] for i in cache.image_ids])
            a, b = a_all[order], cache.block(kind, block, np.float64)
            ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
            p_trials.append(np.mean(_safe_ratio((ac * bc).sum(1), np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1))))
            c_trials.append(np.mean(_safe_ratio((a * b).sum(1), np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        pearson.append(float(np.mean(p_trials)))
        cosine.append(float(np.mean(c_trials)))
    return pearson, cosine


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


# ------------------------------------------------------------------------------------------ CKA


def stream_cka(cache, kind: str, other=None, other_kind: str | None = None, chunk: int = CHUNK_ROWS):
    """``(biased, debiased)`` CKA matrices between the blocks of ``kind`` in ``cache`` (and of ``other_kind``
    in ``other``, rows matched by image id), streamed over row chunks of the HDF5 file."""
    from vtbench.robust.cka import CKAAccumulator

    mine = [(cache, kind, b) for b in range(cache.kinds[kind])]
    theirs = [(other, other_kind or kind, b) for b in range(other.kinds[other_kind or kind])] if other is not None else []
    dims = [c.meta["dims"][k][b] for c, k, b in mine + theirs]
    acc = CKAAccumulator(dims)
    n = len(cache)
    if other is not None:
        rows = _rows_by_id(other)
        missing = [i for i in cache.image_ids if i not in rows]
        if missing:
            raise VTError(f"the two caches hold other images ({len(missing)} of {n} missing, e.g. {missing[0]})")
        order = np.array([rows[i] for i in cache.image_ids])
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        blocks = [cache.block_rows(k, b, start, stop) for c, k, b in mine]
        if other is not None:
            blocks += [other.block_rows(k, b, order[start:stop]) for c, k, b in theirs]
        acc.add(blocks)
    return acc.matrix(False), acc.matrix(True), len(mine)


def run_cka(
    model: str,
    dataset: str,
    *,
    kinds: Sequence[str] | None = None,
    split: str | None = None,
    other_model: str | None = None,
    other_weights: str | None = None,
    other_kind: str | None = None,
    cache_dir=None,
    results_dir=None,
    weights: str | None = None,
    settings: SettingsQuery | dict | None = None,
    data_root=None,
    log: Callable[[str], None] | None = None,
    **select,
) -> list[dict]:
    """Linear CKA between every pair of blocks of one model (per token kind), or between its blocks and another
    model's (``other_model``: ViT blocks against CNN stages, say); one record per kind."""
    from vtbench import results as store
    from vtbench.data import dataset_info
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.paths import writable_dir

    say = log or (lambda msg: None)
    split = split or dataset_info(dataset).test_split
    results_root = writable_dir(default_results_dir(results_dir), "--results")
    query = SettingsQuery.of(settings, **select)
    caches = CacheSet(model, dataset, cache_dir=cache_dir, weights=weights, settings=query, data_root=data_root)
    others = None
    try:
        cache = caches.get(split)
        other = None
        if other_model is not None:
            others = CacheSet(other_model, dataset, cache_dir=cache_dir, weights=other_weights, data_root=data_root)
            other = others.get(split)
        wanted = list(kinds or [k for k in cache.kinds if k not in ("prelogits", "logits")])
        unknown = [k for k in wanted if k not in cache.kinds]
        if unknown:
            raise VTError(f"{model} caches have no '{unknown[0]}' features (they have: {', '.join(cache.kinds)})")
        records = []
        for kind in wanted:
            theirs = other_kind or (kind if other is not None and kind in other.kinds else
                                    (next(k for k in other.kinds if k not in ("prelogits", "logits")) if other is not None else None))
            t0 = time.perf_counter()
            biased, debiased, split_at = stream_cka(cache, kind, other, theirs)
            say(f"CKA {model} {kind}" + (f" vs {other_model} {theirs}" if other else "")
                + f": {len(biased)} blocks, {time.perf_counter() - t0:.1f}s")
            record = store.new_record("cka", cache.meta, protocol="linear-cka", variant="" if other is None else
                                      f"vs-{other_model}-{theirs}", seed=0,
                                      caches={"features": [cache.record_ref()] + ([other.record_ref()] if other else [])},
                                      tokens=kind)
            offdiag = _adjacent_mean(biased[:split_at, :split_at])
            record.update(
                splits={"features": [split]},
                metrics={"adjacent_cka": offdiag, "first_last_cka": float(biased[0, split_at - 1])},
                cka={"biased": biased.tolist(), "debiased": debiased.tolist(), "rows": split_at,
                     "labels": [f"{kind}[{b}]" for b in range(split_at)]
                     + ([f"{other_model}:{theirs}[{b}]" for b in range(len(biased) - split_at)] if other else [])},
                other=({"model": other_model, "weights_sha256": other.meta["weights_sha256"], "tokens": theirs}
                       if other else None),
                measure="linear CKA (Kornblith et al. 2019), biased and debiased (Nguyen et al. 2021), float64, one "
                        "streamed pass over the cache's rows",
                timings={"cka_s": time.perf_counter() - t0})
            record["_path"] = str(store.save(results_root, record))
            records.append(record)
        return records
    finally:
        caches.close()
        if others is not None:
            others.close()


def _adjacent_mean(matrix: np.ndarray) -> float:
    """Mean CKA of consecutive blocks (how much each block changes the representation)."""
    if len(matrix) < 2:
        return 1.0
    return float(np.mean([matrix[i, i + 1] for i in range(len(matrix) - 1)]))
