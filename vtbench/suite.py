"""Suites: a YAML grid of models x datasets x token specs x protocols, run end to end by `vt run`.

A suite file maps one-to-one onto the CLI: every key of its ``extract``,
``probe``, ``fewshot`` and ``leaderboard`` sections is an option of that `vt`
command (dashes become underscores), validated against the command itself
before anything runs. See ``configs/demo.yaml`` (the embedded default) and
``configs/ipvit.yaml`` (the paper's grid).

Running a suite: for each dataset, one extraction pass feeds every model that
shares a transform (caches that exist are reused, interrupted ones resumed),
then probes and few-shot runs (results already stored are skipped), then the
leaderboard and plots. A rerun after an interruption therefore picks up where
it stopped, and ``--dry-run`` prints the plan with what is already done.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vtbench.errors import VTError

if TYPE_CHECKING:
    from vtbench.cache import CacheSet
    from vtbench.settings import SettingsQuery

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"

TOP_LEVEL_KEYS = {
    "suite": "a name for the suite",
    "description": "free text",
    "datasets": "dataset specs, e.g. [dtd, gtsrb] (see `vt datasets`)",
    "roots": "dataset name -> root dir (default: $VT_DATA/<name>)",
    "models": "list of models: {model, checkpoint | random_init | pretrained, seed, model_kwargs, tokens}",
    "cache_dir": "feature caches (vt extract --out; default: $VT_CACHE)",
    "results": "results store (default: $VT_RESULTS, else ./results)",
    "report_dir": "where leaderboard.md/.csv and plots are written",
    "extract": "options of `vt extract`",
    "probe": "options of `vt probe` (omit the section to skip probes), plus per_block_protocols",
    "fewshot": "options of `vt fewshot` (omit the section to skip few-shot)",
    "robust": "perturbations of the test split and the analyses on them (vt robust; omit the section to skip)",
    "leaderboard": "options of `vt leaderboard`, plus plots: [per-block, bars]",
}
MODEL_KEYS = {
    "model": "timm model name",
    "pretrained": "timm's pretrained weights (the default; fetched from the HF hub)",
    "checkpoint": "a weights file, hub:ID or pkg:PACKAGE instead",
    "random_init": "random weights (the no-pretraining reference)",
    "seed": "seed of the random init",
    "model_kwargs": "keyword arguments for timm.create_model, e.g. {img_size: 224}",
    "tokens": "token specs for this model (default: the probe/fewshot section's)",
    "input_size": "input size for this model (a ViT is built for it), instead of the extract section's",
    "robust": "whether the robust section covers this model (default true)",
    "perturb": "perturbations of this model (a list of --perturb specs), instead of the extract section's; each "
               "gets its caches, probes and few-shot runs beside the clean ones",
}
PLOTS = ("per-block", "bars", "robust", "cka")
# Suite-only keys of a section (not options of its command), with what they mean.
SECTION_EXTRAS = {
    "probe": {"per_block_protocols": "the protocols that also get the per-block specs (default: every protocol); "
                                     "the per-block plot shows the first"},
    "leaderboard": {"plots": f"plots written beside the leaderboard: {', '.join(PLOTS)} (default: all)"},
}
_PER_BLOCK = re.compile(r"(cls|patch|stage)\[\d+\]")  # how per-block specs are recorded: cls[3]


@dataclass
class ModelEntry:
    """One row family of the suite: a timm model with its weights and token specs."""

    model: str
    weights: str = "pretrained"  # "pretrained" | "random" | checkpoint path / pkg:...
    seed: int = 0
    model_kwargs: dict = field(default_factory=dict)
    tokens: list[str] | None = None
    input_size: int | None = None
    perturb: list[str] | None = None
    robust: bool = True

    @property
    def label(self) -> str:
        if self.weights == "pretrained":
            return self.model
        if self.weights == "random":
            return f"{self.model} (random init, seed {self.seed})"
        return f"{self.model} ({self.weights})"

    def weights_filter(self) -> str:
        """A `--weights` filter matching this entry's caches and results without loading the model."""
        if self.weights == "pretrained":
            return "hub:"
        if self.weights == "random":
            return f"random-init:seed={self.seed}"
        from vtbench.models.weights import resolve_checkpoint, sha256_file

        return sha256_file(resolve_checkpoint(self.weights)[1])


@dataclass
class Suite:
    path: Path
    name: str
    datasets: list[str]
    models: list[ModelEntry]
    roots: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    results: str | None = None
    report_dir: str | None = None
    extract: dict = field(default_factory=dict)
    probe: dict | None = None
    fewshot: dict | None = None
    robust: dict | None = None
    leaderboard: dict = field(default_factory=dict)

    def shard_parts(self, index: int, count: int) -> list["Suite"]:
        """Shard ``index`` of ``count`` (1-based): the suite's (dataset, model) units taken in order, unit k going
        to shard k mod count + 1, as one sub-suite per dataset holding that shard's models. Every shard of a
        job array thereby runs a disjoint, deterministic share; their results land in one store."""
        if count < 1 or not 1 <= index <= count:
            raise VTError(f"--shard {index}/{count}: give I/N with 1 <= I <= N (e.g. 1/4 ... 4/4)")
        parts, unit = [], 0
        for dataset in self.datasets:
            mine = []
            for entry in self.models:
                if unit % count == index - 1:
                    mine.append(entry)
                unit += 1
            if mine:
                parts.append(replace(self, datasets=[dataset], models=mine))
        return parts

    def only(self, datasets: list[str]) -> "Suite":
        """The same suite restricted to some of its datasets (given as in the suite, or as short names)."""
        from vtbench.data import canonical_spec

        canonical = {canonical_spec(d): d for d in self.datasets}
        keep = []
        for name in datasets:
            try:
                found = canonical.get(canonical_spec(name))
            except VTError:
                found = None
            if found is None:
                raise VTError(f"{self.path}: '{name}' is not one of the suite's datasets ({', '.join(self.datasets)})")
            keep.append(found)
        return replace(self, datasets=list(dict.fromkeys(keep)))

    def perturb_specs(self, entry: "ModelEntry") -> list[str]:
        """The model's perturbations as --perturb specs (its own list, else the extract section's)."""
        return list(entry.perturb if entry.perturb is not None else self.extract.get("perturb") or [])

    def perturbations_for(self, entry: "ModelEntry") -> list[str | None]:
        """None (the clean features) and one query spec per perturbation (per trial) of this model."""
        from vtbench.perturb.spec import parse_all, spec_of

        return [None] + [spec_of(p) for p in parse_all(self.perturb_specs(entry))]

    def settings_for(self, entry: "ModelEntry", perturb: str | None = None) -> "SettingsQuery":
        """The extraction settings of this model's caches (the extract section's, with extract's defaults, and
        the model's input size; ``perturb`` one of its perturbations): which caches and results are the suite's."""
        from vtbench.settings import DEFAULT_DTYPE, DEFAULT_NORM, DEFAULT_TRANSFORM, SettingsQuery

        ex = self.extract
        return SettingsQuery(transform=ex.get("transform", DEFAULT_TRANSFORM), input_size=self.input_size_for(entry),
                             crop_pct=ex.get("crop_pct"), interpolation=ex.get("interpolation"),
                             norm=ex.get("norm", DEFAULT_NORM), dtype=ex.get("dtype", DEFAULT_DTYPE), perturb=perturb)

    def caches_for(self, entry: "ModelEntry", dataset: str, weights: str | None = None,
                   perturb: str | None = None) -> "CacheSet":
        """The caches of this model (``weights``: a sha256, else the entry's weights filter) on ``dataset``."""
        from vtbench.cache import CacheSet

        return CacheSet(entry.model, dataset, cache_dir=self.cache_dir, weights=weights or entry.weights_filter(),
                        settings=self.settings_for(entry, perturb), data_root=self.data_root_for(dataset))

    def input_size_for(self, entry: "ModelEntry") -> int | None:
        """The input size this model's caches are made at: its own ``input_size``, else the extract section's."""
        return entry.input_size if entry.input_size is not None else self.extract.get("input_size")

    def root_for(self, dataset: str) -> str | None:
        name = dataset.split(":", 1)[0]
        root = self.roots.get(dataset) or self.roots.get(name)
        return str(Path(root).expanduser()) if root else None

    def data_root_for(self, dataset: str) -> Path | None:
        """The dataset root extract reads (``roots:``, else $VT_DATA/<name>): the suite's caches are those of the
        images there. None for datasets that carry their own path or live in memory, and for a root that is not
        on disk (a suite whose caches are all made needs no files)."""
        from vtbench.data.registry import resolve_root

        root = resolve_root(dataset, self.root_for(dataset))
        return root if root is not None and root.is_dir() else None

    def results_dir(self) -> Path:
        from vtbench.paths import results_dir

        return results_dir(self.results)

    def report_path(self) -> Path:
        return Path(self.report_dir).expanduser() if self.report_dir else self.results_dir()


# --------------------------------------------------------------------------- loading and validation


def _section_options(section: str) -> dict:
    """The library's options of `vt SECTION`, by name: the schema a suite section is checked against."""
    from vtbench.extract.run import EXTRACT_OPTIONS
    from vtbench.fewshot.run import FEWSHOT_OPTIONS
    from vtbench.options import by_name
    from vtbench.report.leaderboard import LEADERBOARD_OPTIONS
    from vtbench.robust.run import SUITE_ROBUST_OPTIONS
    from vtbench.transfer.probe import PROBE_OPTIONS

    return by_name({"extract": EXTRACT_OPTIONS, "probe": PROBE_OPTIONS, "fewshot": FEWSHOT_OPTIONS,
                    "robust": SUITE_ROBUST_OPTIONS, "leaderboard": LEADERBOARD_OPTIONS}[section])


def key_reference() -> str:
    """Every key a suite file takes, in markdown (docs/suite.md is this text; `vt run --keys` prints it).

    Section keys are the options of the `vt` command of that name (their help text is theirs); the keys
    a suite sets itself (model, dataset, caches, results, roots) are left out of the sections.
    """
    lines = ["# Suite files: every key", "",
             "A suite (`vt run SUITE.yaml`) is a YAML mapping. This page is generated from the code "
             "(`vt run --keys`), so it lists exactly what `vt run` accepts.", "", "## Top level", "",
             "| key | meaning |", "|---|---|"]
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines += [f"| `{k}` | {cell(v)} |" for k, v in TOP_LEVEL_KEYS.items()]
    lines += ["", "## `models:` entries", "", "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {cell(v)} |" for k, v in MODEL_KEYS.items()]
    for section in ("extract", "probe", "fewshot", "robust", "leaderboard"):
        params = {k: o for k, o in sorted(_section_options(section).items()) if o.suite}
        lines += ["", f"## `{section}:` (the options of `vt {section}`)", "", "| key | option | meaning |",
                  "|---|---|---|"]
        for name, opt in params.items():
            flag = max([f for f in opt.flag_names() if not f.startswith("--no-")], key=len)
            lines.append(f"| `{name}` | `{flag}` | {cell(opt.help)} |")
        for name, meaning in SECTION_EXTRAS.get(section, {}).items():
            lines.append(f"| `{name}` | | {meaning} |")
    return "\n".join(lines) + "\n"


def _convert(opt, value, where: str):
    """Check and convert a YAML value against the type of a `vt` option (int, float, bool, str, path, lists)."""
    if value is None:
        if opt.default is None or opt.multiple:
            return None
        raise VTError(f"{where}: needs a value")
    if opt.multiple:
        return [_scalar(opt.type, v, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, (list, dict)):
        raise VTError(f"{where}: takes one value, not a {type(value).__name__}")
    return _scalar(opt.type, value, where)


def _scalar(kind, value, where: str):
    if kind is bool:
        if not isinstance(value, bool):
            raise VTError(f"{where}: must be true or false, not {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise VTError(f"{where}: must be an integer, not {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VTError(f"{where}: must be a number, not {value!r}")
        return float(value)
    if isinstance(value, (list, dict)) or isinstance(value, bool):
        raise VTError(f"{where}: must be a string, not {value!r}")
    return Path(str(value)) if kind is Path else str(value)


def _section(raw: dict, section: str, source: str) -> dict:
    values = raw.get(section) or {}
    if not isinstance(values, dict):
        raise VTError(f"{source}: '{section}' must be a mapping of `vt {section}` options")
    params = _section_options(section)
    allowed = {k for k, o in params.items() if o.suite} | set(SECTION_EXTRAS.get(section, {}))
    out = {}
    for key, value in values.items():
        where = f"{source}: {section}.{key}"
        if key not in allowed:
            owned = " (the suite sets it)" if key in params else ""
            raise VTError(f"{where}: unknown key{owned}; valid keys: {', '.join(sorted(allowed))}")
        if key == "plots":
            plots = value if isinstance(value, list) else [value]
            bad = [p for p in plots if p not in PLOTS]
            if bad:
                raise VTError(f"{where}: unknown plot {bad[0]!r}; choose from {', '.join(PLOTS)}")
            out[key] = plots
            continue
        if key == "per_block_protocols":
            from vtbench.transfer.probe import check_probe_options

            try:
                out[key] = check_probe_options(protocol=value if isinstance(value, list) else [value])
            except VTError as exc:
                raise VTError(f"{where}: {exc}") from None
            continue
        out[key] = _convert(params[key], value, where)
    return out


def _model_entry(item, index: int, source: str) -> ModelEntry:
    where = f"{source}: models[{index}]"
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, dict) or "model" not in item:
        raise VTError(f"{where}: each model needs at least 'model: <timm name>'")
    unknown = set(item) - set(MODEL_KEYS)
    if unknown:
        raise VTError(f"{where}.{sorted(unknown)[0]}: unknown key; valid keys: {', '.join(sorted(MODEL_KEYS))}")
    params = _section_options("extract")
    from vtbench.options import weights_choice

    checked = {k: _convert(params[k], item[k], f"{where}.{k}") for k in ("pretrained", "checkpoint", "random_init", "seed")
               if k in item}
    weights = weights_choice(checked.get("pretrained", True), checked.get("checkpoint"), checked.get("random_init", False))
    kwargs = item.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise VTError(f"{where}.model_kwargs: must be a mapping, e.g. {{img_size: 64}}")
    tokens = item.get("tokens")
    if tokens is not None:
        tokens = [str(t) for t in (tokens if isinstance(tokens, list) else [tokens])]
    size = _convert(params["input_size"], item["input_size"], f"{where}.input_size") if "input_size" in item else None
    perturb = _convert(params["perturb"], item["perturb"], f"{where}.perturb") if "perturb" in item else None
    if perturb:
        from vtbench.perturb.spec import parse_all

        try:
            parse_all(perturb)
        except VTError as exc:
            raise VTError(f"{where}.perturb: {exc}") from None
    robust = item.get("robust", True)
    if not isinstance(robust, bool):
        raise VTError(f"{where}.robust: must be true or false, not {robust!r}")
    return ModelEntry(str(item["model"]), weights, checked.get("seed", 0), dict(kwargs), tokens, size, perturb, robust)


def load_suite(path: str | os.PathLike | None = None) -> Suite:
    """Read and fully validate a suite file (default: the embedded demo). Raises VTError on any bad key or value."""
    import yaml

    from vtbench.tokens import parse_spec

    path = Path(path) if path else DEMO
    if not path.is_file():
        raise VTError(f"no suite file at {path}")
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise VTError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise VTError(f"{source}: a suite is a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    unknown = set(raw) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise VTError(f"{source}: unknown key '{sorted(unknown)[0]}'; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    datasets = raw.get("datasets")
    if not datasets or not isinstance(datasets, list):
        raise VTError(f"{source}: 'datasets' must be a non-empty list")
    from vtbench.data import dataset_info

    for i, spec in enumerate(datasets):
        try:
            dataset_info(str(spec))
        except VTError as exc:
            raise VTError(f"{source}: datasets[{i}]: {exc}") from None
    models = raw.get("models")
    if not models or not isinstance(models, list):
        raise VTError(f"{source}: 'models' must be a non-empty list")
    roots = raw.get("roots") or {}
    if not isinstance(roots, dict):
        raise VTError(f"{source}: 'roots' must map dataset names to directories")
    suite = Suite(
        path=path,
        name=str(raw.get("suite") or path.stem),
        datasets=[str(d) for d in datasets],
        models=[_model_entry(m, i, source) for i, m in enumerate(models)],
        roots={str(k): str(v) for k, v in roots.items()},
        cache_dir=raw.get("cache_dir"),
        results=raw.get("results"),
        report_dir=raw.get("report_dir"),
        extract=_section(raw, "extract", source),
        probe=_section(raw, "probe", source) if raw.get("probe") is not None else None,
        fewshot=_section(raw, "fewshot", source) if raw.get("fewshot") is not None else None,
        robust=_section(raw, "robust", source) if raw.get("robust") is not None else None,
        leaderboard=_section(raw, "leaderboard", source),
    )
    for i, entry in enumerate(suite.models):
        for spec in entry.tokens or []:
            try:
                parse_spec(spec)
            except VTError as exc:
                raise VTError(f"{source}: models[{i}].tokens: {exc}") from None
    _check_values(suite, source)
    return suite


def _check_robust(suite: Suite, source: str) -> None:
    from vtbench.perturb.spec import parse_all
    from vtbench.transfer.probe import check_probe_options

    if suite.robust is None:
        return
    try:
        if not parse_all(suite.robust.get("perturb")):
            raise VTError("perturb: name at least one perturbation, e.g. [patchdrop:random:0.25,0.5,0.75]")
        check_probe_options(protocol=suite.robust.get("protocol") or ["default"])
    except VTError as exc:
        raise VTError(f"{source}: robust: {exc}") from None


def _check_values(suite: Suite, source: str) -> None:
    """Run each section through the checks its command makes, so that a bad value stops the suite before it
    extracts anything rather than at its first probe."""
    _check_robust(suite, source)
    from vtbench.extract.run import check_extract_options
    from vtbench.fewshot.run import check_fewshot_options
    from vtbench.transfer.probe import check_probe_options

    for section, options, check in (("extract", suite.extract, check_extract_options),
                                    ("probe", suite.probe, check_probe_options),
                                    ("fewshot", suite.fewshot, check_fewshot_options)):
        if options is None:
            continue
        checked = inspect.signature(check).parameters
        try:
            check(**{k: v for k, v in options.items() if k in checked})
        except VTError as exc:
            raise VTError(f"{source}: {section}: {exc}") from None


# --------------------------------------------------------------------------- the plan


@dataclass
class Step:
    """One unit of work in a suite run, with whether it is already done."""

    kind: str  # extract | probe | fewshot | report
    dataset: str
    what: str
    done: bool

    def line(self) -> str:
        return f"[{'done' if self.done else 'todo'}] {self.kind:8s} {self.dataset:14s} {self.what}"


def _tokens(suite: Suite, entry: ModelEntry, section: dict) -> list[str]:
    return entry.tokens or section.get("tokens") or ["cls[-1]"]


def _cached_splits(suite: Suite, entry: ModelEntry, dataset: str) -> tuple[list[str], list[str]]:
    """(splits the suite extracts, those already cached for this entry)."""
    from vtbench.data import available_splits, dataset_info

    info = dataset_info(dataset)
    wanted = [s for s in dict.fromkeys([info.train_split, info.val_split, info.test_split]) if s]
    try:
        present = available_splits(dataset, suite.root_for(dataset))
        wanted = [s for s in wanted if s in present]
    except VTError:
        pass  # data not on disk yet: plan the usual splits
    sets, done = [suite.caches_for(entry, dataset, perturb=p) for p in suite.perturbations_for(entry)], []
    for split in wanted:
        try:
            for caches in sets:
                caches.find(split)
            done.append(split)
        except VTError:
            pass
    return wanted, done


def _stored(suite: Suite, records: list[dict], entry: ModelEntry, dataset: str, task: str,
            perturb: str | None = None) -> list[dict]:
    """Stored records of this entry and dataset made from caches with the suite's extraction settings (and
    ``perturb``, else clean ones)."""
    from vtbench.data import canonical_spec

    from vtbench.cache.select import same_data, weights_match

    wfilter = entry.weights_filter()
    canon = canonical_spec(dataset)
    settings = suite.settings_for(entry, perturb)
    root = suite.data_root_for(dataset)

    def on_suite_data(r: dict) -> bool:
        refs = [ref for refs in (r.get("caches") or {}).values() for ref in refs]
        return root is None or all(same_data(ref, root) for ref in refs if "data_fingerprint" in ref)

    return [r for r in records if r.get("task") == task and r.get("model") == entry.model and r.get("dataset") == canon
            and weights_match(wfilter, r["weights"].get("sha256"), r["weights"].get("source"))
            and settings.matches(r, clean_unless_given=True) and on_suite_data(r)]


def _fewshot_protocols(options: dict) -> list[str]:
    """Protocol names the few-shot section produces (as recorded by vtbench.fewshot)."""
    from vtbench.fewshot.run import protocols_for

    return protocols_for(**{k: options.get(k) for k in ("sampler", "ways", "shots", "queries")})


def _evaluation_steps(suite: Suite, records: list[dict], entry: ModelEntry, dataset: str,
                      perturb: str | None) -> list[Step]:
    """The probe and few-shot steps of one model on one dataset, on its clean or ``perturb``-ed caches."""
    from vtbench.tokens import parse_spec

    label = entry.label + (f" [{perturb}]" if perturb else "")
    steps = []
    if suite.probe is not None:
        stored = _stored(suite, records, entry, dataset, "probe", perturb)
        for protocol in suite.probe.get("protocol") or ["default"]:
            for spec in _tokens(suite, entry, suite.probe):
                canon = str(parse_spec(spec))
                hit = any(r["tokens"] == canon and r["protocol"] == protocol for r in stored)
                steps.append(Step("probe", dataset, f"{label} {canon} {protocol}", hit))
            if protocol in per_block_protocols(suite):
                n = sum(1 for r in stored if r["protocol"] == protocol and _PER_BLOCK.fullmatch(r["tokens"]))
                steps.append(Step("probe", dataset, f"{label} per-block {protocol} ({n} stored)", n > 0))
    if suite.fewshot is not None:
        stored = _stored(suite, records, entry, dataset, "fewshot", perturb)
        for spec in _tokens(suite, entry, suite.fewshot):
            canon = str(parse_spec(spec))
            for protocol in _fewshot_protocols(suite.fewshot):
                for classifier in suite.fewshot.get("classifier") or ["lr"]:
                    hit = any(r["tokens"] == canon and r["protocol"] == protocol
                              and r.get("variant", "").split("+")[0] == classifier for r in stored)
                    steps.append(Step("fewshot", dataset, f"{label} {canon} {protocol} {classifier}", hit))
    return steps


def robust_specs(suite: Suite) -> list[str]:
    """The robust section's perturbations, one query spec each."""
    from vtbench.perturb.spec import parse_all, spec_of

    return [spec_of(p) for p in parse_all(suite.robust.get("perturb"))] if suite.robust else []


def _robust_tokens(suite: Suite, entry: ModelEntry) -> list[str]:
    return suite.robust.get("tokens") or (entry.tokens or ["cls[-1]"])[:1]


def _arch(entry: ModelEntry) -> str:
    """vit or cnn, from the architecture alone (built on the meta device: no weights, no memory)."""
    return _arch_of(entry.model, json.dumps(entry.model_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _arch_of(model: str, model_kwargs: str) -> str:  # once per model, not once per dataset and plan
    import torch

    from vtbench.models.backbone import inspect_architecture, instantiate

    with torch.device("meta"):
        return inspect_architecture(instantiate(model, json.loads(model_kwargs)), model)[0]


def _robust_steps(suite: Suite, records: list[dict], dataset: str) -> list[Step]:
    """One step per model of the robust section: its perturbed test caches scored by every protocol and spec."""
    if suite.robust is None:
        return []
    from vtbench.cache.select import weights_match
    from vtbench.data import canonical_spec

    from vtbench.perturb.spec import applies_to, parse

    steps = []
    protocols = suite.robust.get("protocol") or ["default"]
    for entry in suite.models:
        if not entry.robust:
            continue
        arch = _arch(entry)
        specs = [s for s in robust_specs(suite) if applies_to(parse(s)[0], arch)]
        wanted = (len(specs) + 1) * len(protocols) * len(_robust_tokens(suite, entry))
        wfilter = entry.weights_filter()
        have = sum(1 for r in records if r.get("task") == "robust" and r.get("model") == entry.model
                   and r.get("dataset") == canonical_spec(dataset)
                   and weights_match(wfilter, r["weights"].get("sha256"), r["weights"].get("source")))
        extras = (", stability" if suite.robust.get("stability") else "") + (
            f", CKA of {', '.join(suite.robust['cka'])}" if suite.robust.get("cka") else "")
        steps.append(Step("robust", dataset, f"{entry.label}: {len(specs)} perturbations x {len(protocols)} "
                          f"protocol(s){extras} ({have}/{wanted} stored)", have >= wanted))
    return steps


def plan(suite: Suite) -> list[Step]:
    """Every step of the suite, marked done where its cache or result already exists."""
    from vtbench import results as store

    records = store.load(suite.results_dir()).records
    steps = []
    for dataset in suite.datasets:
        for entry in suite.models:
            wanted, done = _cached_splits(suite, entry, dataset)
            steps.append(Step("extract", dataset, f"{entry.label}: splits {', '.join(wanted)}"
                              + (f" ({len(done)}/{len(wanted)} cached)" if done else ""), len(done) == len(wanted)))
        for entry in suite.models:
            for perturb in suite.perturbations_for(entry):
                steps += _evaluation_steps(suite, records, entry, dataset, perturb)
        steps += _robust_steps(suite, records, dataset)
    report = suite.report_path()
    steps.append(Step("report", "*", f"leaderboard + plots in {report}", (report / "leaderboard.md").exists()))
    return steps


# --------------------------------------------------------------------------- running


def _build_backbones(suite: Suite, device: str | None, say) -> list:
    from vtbench.device import resolve_device
    from vtbench.models import create_backbone

    dev = resolve_device(device)
    return [create_backbone(e.model, e.weights, model_kwargs=e.model_kwargs, input_size=suite.input_size_for(e),
                            seed=e.seed, device=dev, log=say)
            for e in suite.models]


def _check_inputs(suite: Suite, backbones: list, steps: list[Step]) -> None:
    """Fail before any work on what would otherwise stop the suite midway: a dataset whose files are
    missing (unless every cache it needs is already made), or a token spec a model does not have."""
    from vtbench.data import available_splits
    from vtbench.data.registry import checked_root
    from vtbench.tokens import parse_spec

    for dataset in suite.datasets:
        if not all(s.done for s in steps if s.kind == "extract" and s.dataset == dataset):
            try:
                checked_root(dataset, suite.root_for(dataset), "give it under 'roots:' in the suite, or set $VT_DATA")
                available_splits(dataset, suite.root_for(dataset))
            except VTError as exc:
                raise VTError(f"{suite.path}: {exc}") from None
    wanted_kinds = suite.extract.get("kinds")
    for entry, bb in zip(suite.models, backbones):
        blocks = {kind: len(dims) for kind, dims in bb.layout.items() if not wanted_kinds or kind in wanted_kinds}
        for section in (suite.probe, suite.fewshot):
            for spec in _tokens(suite, entry, section) if section is not None else []:
                try:
                    parse_spec(spec).resolve(blocks)
                except VTError as exc:
                    raise VTError(f"{suite.path}: {entry.label}: {exc}") from None


def run_shard(suite: Suite, index: int, count: int, *, dry_run: bool = False, progress: bool = True,
              log: Callable[[str], Any] | None = None) -> list[Step]:
    """Run (or plan) shard ``index`` of ``count`` of a suite (:meth:`Suite.shard_parts`), without the report: the
    shards share the results store, and `vt run SUITE` (no shard) or `vt leaderboard` reports them together."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    parts = suite.shard_parts(index, count)
    say(f"suite {suite.name}, shard {index}/{count}: " + ("; ".join(
        f"{p.datasets[0]}: {', '.join(e.label for e in p.models)}" for p in parts) or "nothing (more shards than units)"))
    steps = []
    for part in parts:
        steps += run_suite(part, dry_run=dry_run, progress=progress, log=say, report=False)
    if not dry_run:
        say(f"shard {index}/{count} done; once every shard is, `vt run {suite.path}` writes the leaderboard and plots "
            f"from the shared store ({suite.results_dir()}), or `vt leaderboard {suite.results_dir()}` shows it")
    return steps


def run_suite(suite: Suite, *, dry_run: bool = False, progress: bool = True,
              log: Callable[[str], Any] | None = None, report: bool = True) -> list[Step]:
    """Run (or with ``dry_run`` only plan) a suite; returns the plan as it stood before running. ``report=False``
    leaves out the leaderboard and plots (shards)."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    steps = plan(suite)
    if not report:
        steps = [s for s in steps if s.kind != "report"]
    todo = sum(not s.done for s in steps)
    say(f"suite {suite.name}: {len(steps)} steps, {len(steps) - todo} already done")
    for step in steps:
        say("  " + step.line())
    if dry_run:
        return steps

    from vtbench.extract import extract
    from vtbench.paths import cache_dir, writable_dir

    ex = dict(suite.extract)
    ex.pop("input_size", None)  # each backbone is built, and its transform sized, for its own (input_size_for)
    ex.pop("perturb", None)  # each model's own list (perturb_specs)
    backbones = _build_backbones(suite, ex.get("device"), say)
    _check_inputs(suite, backbones, steps)
    # Every output folder takes files before any work (not after the first extraction), once the inputs are sound.
    writable_dir(suite.results_dir(), f"{suite.path}: results:")
    writable_dir(suite.report_path(), f"{suite.path}: report_dir:")
    writable_dir(cache_dir(suite.cache_dir), f"{suite.path}: cache_dir:")
    # Models with the same perturbations share one decode pass (all of them, where none has its own list).
    by_perturbations: dict[tuple, list] = {}
    for entry, bb in zip(suite.models, backbones):
        by_perturbations.setdefault(tuple(suite.perturb_specs(entry)), []).append(bb)
    for dataset in suite.datasets:
        say(f"== {dataset}: extract")
        for specs, members in by_perturbations.items():
            for made in extract(members, dataset, None, suite.root_for(dataset), cache_dir=suite.cache_dir,
                                progress=progress, perturb=list(specs), **ex):
                say("  " + made.summary())
        for entry, bb in zip(suite.models, backbones):
            for perturb in suite.perturbations_for(entry):
                _evaluate(suite, entry, bb, dataset, perturb, say)
        if suite.robust is not None:
            _robustness(suite, backbones, dataset, ex, progress, say)
    if report:
        write_report(suite, say)
    return steps


def _evaluate(suite: Suite, entry: ModelEntry, bb, dataset: str, perturb: str | None, say) -> None:
    """The probe and few-shot sections for one model on one dataset, on its clean or ``perturb``-ed caches."""
    from vtbench.fewshot import run_fewshot

    pick = dict(cache_dir=suite.cache_dir, weights=bb.weights_sha256, skip_existing=True,
                settings=suite.settings_for(entry, perturb), data_root=suite.data_root_for(dataset))
    label = entry.label + (f" [{perturb}]" if perturb else "")
    if suite.probe is not None:
        say(f"== {dataset}: probe {label}")
        for rec in _run_probes(suite, entry, dataset, pick, say):
            state = " (stored)" if rec.get("skipped") else ""
            say(f"  {rec['tokens']:24s} {rec['protocol']:8s} top1 {rec['metrics']['top1']:.2f}{state}")
    if suite.fewshot is not None:
        opts = {k: v for k, v in suite.fewshot.items() if k != "tokens"}
        say(f"== {dataset}: few-shot {label}")
        for rec in run_fewshot(entry.model, dataset, _tokens(suite, entry, suite.fewshot),
                               results_dir=suite.results, log=say, **opts, **pick):
            m = rec["metrics"]
            state = " (stored)" if rec.get("skipped") else ""
            say(f"  {rec['tokens']:24s} {rec['protocol']} {rec['variant']:10s} "
                f"{m['accuracy']:.2f} ± {m['ci95']:.2f}{state}")


def _robustness(suite: Suite, backbones: list, dataset: str, ex: dict, progress: bool, say) -> None:
    """The robust section on one dataset: perturbed test caches of its models, then the analyses."""
    from vtbench.data import dataset_info
    from vtbench.extract import extract
    from vtbench.perturb.spec import applies_to, parse

    members = [(entry, bb) for entry, bb in zip(suite.models, backbones) if entry.robust]
    test = dataset_info(dataset).test_split
    say(f"== {dataset}: robust ({len(robust_specs(suite))} perturbations of {test})")
    by_specs: dict[tuple, list] = {}
    for entry, bb in members:  # block-index lesions are ViTs', stage.block ones CNNs'
        specs = tuple(s for s in robust_specs(suite) if applies_to(parse(s)[0], bb.arch))
        by_specs.setdefault(specs, []).append((entry, bb))
    for specs, group in by_specs.items():
        for report in extract([bb for _, bb in group], dataset, [test], suite.root_for(dataset),
                              cache_dir=suite.cache_dir, progress=progress, perturb=list(specs), **ex):
            say("  " + report.summary())
        for entry, bb in group:
            _robust_analyses(suite, entry, bb, dataset, list(specs), say)


def _robust_analyses(suite: Suite, entry: ModelEntry, bb, dataset: str, specs: list[str], say) -> None:
    """Accuracy under the perturbations (probes where the dataset has a train split, the model's own head
    where its classes are ImageNet's), then stability and CKA where asked."""
    from vtbench.data import available_splits, dataset_info
    from vtbench.perturb.spec import label
    from vtbench.robust import run_accuracy, run_cka, run_stability

    pick = dict(cache_dir=suite.cache_dir, results_dir=suite.results, weights=bb.weights_sha256,
                settings=suite.settings_for(entry), data_root=suite.data_root_for(dataset))
    info = dataset_info(dataset)
    try:
        trainable = info.train_split in available_splits(dataset, suite.root_for(dataset))
    except VTError:
        trainable = True  # no files on disk: the caches decide
    runs = []
    if trainable:
        runs.append((_robust_tokens(suite, entry), suite.robust.get("protocol") or ["default"]))
    else:
        say(f"  {dataset} has no {info.train_split} split: no probe to fit (the head protocol needs none)")
    if suite.robust.get("head") and "logits" in bb.layout and _imagenet_classes(dataset, suite):
        runs.append((["logits"], ["head"]))
    for tokens, protocols in runs:
        for rec in run_accuracy(entry.model, dataset, tokens, protocols, perturb=specs, skip_existing=True, log=say,
                                **pick):
            m = rec["metrics"]
            say(f"  {entry.label} {rec['tokens']} {rec['protocol']} {label(rec.get('perturbation'))}: top1 "
                f"{m['top1']:.2f} (relative {m['relative']:.3f})" + (" (stored)" if rec.get("skipped") else ""))
    if suite.robust.get("stability"):
        run_stability(entry.model, dataset, perturb=specs, log=say, **pick)
    kinds = [k for k in suite.robust.get("cka") or [] if k in bb.layout]
    if kinds:
        run_cka(entry.model, dataset, kinds=kinds, log=say, **pick)


def _imagenet_classes(dataset: str, suite: Suite) -> bool:
    """Whether the dataset's classes are ImageNet synsets (so a model's own head can score it)."""
    from vtbench.data import dataset_info, get_dataset
    from vtbench.data.imagenet import imagenet_class_index

    try:
        imagenet_class_index(get_dataset(dataset, dataset_info(dataset).test_split, suite.root_for(dataset)).class_names)
        return True
    except VTError:
        return False


def per_block_protocols(suite: Suite) -> list[str]:
    """The probe protocols that also run the per-block specs."""
    if not suite.probe or not suite.probe.get("per_block"):
        return []
    protocols = suite.probe.get("protocol") or ["default"]
    return [p for p in protocols if p in suite.probe.get("per_block_protocols", protocols)]


def _run_probes(suite: Suite, entry: ModelEntry, dataset: str, pick: dict, say) -> list[dict]:
    """The probe section for one model and dataset: the per-block protocols with the per-block specs, the others without."""
    from vtbench.transfer import run_probe

    opts = {k: v for k, v in suite.probe.items() if k not in ("tokens", "protocol", "per_block", "per_block_protocols")}
    with_blocks = per_block_protocols(suite)
    without = [p for p in suite.probe.get("protocol") or ["default"] if p not in with_blocks]
    records = []
    for protocols, per_block in ((with_blocks, True), (without, False)):
        if protocols:
            records += run_probe(entry.model, dataset, _tokens(suite, entry, suite.probe), protocols,
                                 per_block=per_block, results_dir=suite.results, log=say, **opts, **pick)
    return records


def write_report(suite: Suite, say: Callable[[str], Any]) -> Path:
    """Leaderboard (markdown + csv) and the plots asked for, into the suite's report dir; prints the markdown."""
    from vtbench import results as store
    from vtbench.report.leaderboard import build_leaderboard

    opts = dict(suite.leaderboard)
    plots = opts.pop("plots", list(PLOTS))
    filters = {"protocols": opts.get("protocol"), "tokens": opts.get("tokens"), "models": opts.get("models"),
               "datasets": opts.get("datasets"), "metric": opts.get("metric")}
    out = suite.report_path()
    out.mkdir(parents=True, exist_ok=True)
    table = store.load(suite.results_dir())
    board = build_leaderboard(table, **filters)
    (out / "leaderboard.md").write_text(board.to_markdown())
    (out / "leaderboard.csv").write_text(board.to_csv())
    say(f"== leaderboard ({out / 'leaderboard.md'})")
    say(board.to_markdown())
    if "per-block" in plots and per_block_protocols(suite):
        from vtbench.report.plots import plot_per_block

        for dataset in suite.datasets:
            from vtbench.data import canonical_spec

            png = out / f"per_block_{canonical_spec(dataset).replace(':', '_').replace('/', '_')}.png"
            plot_per_block(table, canonical_spec(dataset), png, protocol=per_block_protocols(suite)[0])
            say(f"   plot: {png}")
    if "bars" in plots:
        from vtbench.report.plots import plot_bars

        png = out / "bars.png"
        plot_bars(table, png)
        say(f"   plot: {png}")
    if suite.robust is not None:
        _robust_plots(suite, table, plots, out, say)
    return out


def _robust_plots(suite: Suite, table, plots: list[str], out: Path, say) -> None:
    from vtbench.data import canonical_spec
    from vtbench.report import plots as figures

    for name, task, draw in (("robust", "robust", figures.plot_robustness), ("cka", "cka", figures.plot_cka)):
        if name not in plots:
            continue
        for dataset in map(canonical_spec, suite.datasets):
            if any(r["task"] == task and r["dataset"] == dataset for r in table):
                png = out / f"{name}_{dataset.replace(':', '_').replace('/', '_')}.png"
                draw(table, dataset, png)
                say(f"   plot: {png}")
