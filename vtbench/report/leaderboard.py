"""Leaderboard tables from the results store: ``vt leaderboard``.

:func:`build_leaderboard` turns a :class:`~vtbench.results.ResultsTable` into a
:class:`Leaderboard`: one table per task (probe, few-shot), with one row per
model + weights + extraction settings + token spec + protocol/variant and one column per
dataset, then the mean over datasets and the average rank. Notes below the
tables say what every number is: protocols, metric, weights (sha256), seeds,
episodes, splits and vtbench versions. Rendering (:meth:`Leaderboard.to_markdown`,
:meth:`~Leaderboard.to_csv`, :meth:`~Leaderboard.to_json`) is deterministic:
rows and columns are sorted and nothing depends on the clock.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

from vtbench.errors import VTError
from vtbench.options import Opt
from vtbench.perturb.spec import label as perturbation_label
from vtbench.perturb.spec import describe as describe_perturbation
from vtbench.perturb.spec import sort_key
from vtbench.protocols import protocol_note, variant_part_note
from vtbench.results import ResultsTable, convergence_note, data_id, data_label, load
from vtbench.settings import SELECT_OPTIONS, FeatureSettings, SettingsQuery
from vtbench.tokens import parse_spec

SCHEMA = "vtbench-leaderboard/1"
FORMATS = ("markdown", "csv", "json")

# `vt leaderboard`'s options and a suite's leaderboard keys. Each filter of results by extraction settings is
# one of vtbench.settings.SELECT_OPTIONS.
LEADERBOARD_OPTIONS = (
    Opt("results_dir", Path, None, "Results directory (default: $VT_RESULTS or ./results).", argument=True, suite=False),
    Opt("fmt", str, "markdown", "markdown, csv or json.", flag="--format", short="-f", suite=False),
    Opt("out", Path, None, "Write to this file instead of stdout.", short="-o", suite=False),
    Opt("protocol", str, None, "Only these protocols (repeat or comma-separate).", short="-p", multiple=True),
    Opt("tokens", str, None, "Only these token specs (default: all but per-block ones like cls[3]).", short="-t",
        multiple=True),
    Opt("models", str, None, "Only these models.", aliases=("--model",), short="-m", multiple=True),
    Opt("datasets", str, None, "Only these datasets.", aliases=("--dataset",), short="-d", multiple=True),
    Opt("metric", str, None, "Metric to show (default: top1 for probes, accuracy for few-shot)."),
    *(replace(o, help=o.help.replace("Pick caches", "Only results from caches")) for o in SELECT_OPTIONS),
)
MISSING = "—"
PARTIAL = "*"  # marks a Mean / Avg rank over fewer datasets than the table has

# Tables come in this order; other tasks follow alphabetically.
TASK_ORDER = ("probe", "fewshot", "robust", "stability", "cka")

# Metrics that are fractions in [0, 1] (or correlations), not percentages: shown with 3 decimals, no "%".
FRACTION_METRICS = ("relative", "pearson", "cosine", "adjacent_cka", "first_last_cka")

# The metric a task's table shows when none is asked for.
DEFAULT_METRIC = {"probe": "top1", "fewshot": "accuracy", "robust": "top1", "stability": "pearson",
                  "cka": "adjacent_cka"}

METRIC_NOTES = {
    "top1": "top-1 accuracy on the test split (%)",
    "top5": "top-5 accuracy on the test split (%)",
    "mean_per_class": "mean per-class recall on the test split (%)",
    "top1_last_epoch": "test top-1 after the last training epoch (%)",
    "top1_max_over_epochs": "maximum test top-1 over the training epochs (%), as the IPViT paper reported; "
    "selected on the test split, so optimistic",
    "accuracy": "mean episode accuracy ± 95% confidence half-width (1.96·std/√episodes), %",
    "relative": "top-1 under the perturbation / clean top-1 of the same probe",
    "pearson": "mean over test images of the Pearson correlation between the last block's clean and perturbed "
               "feature (vt robust stability)",
    "adjacent_cka": "mean linear CKA between consecutive blocks on the test images (vt robust cka)",
}

# What the parts of a variant name that vtbench.fewshot.run writes about its episodes mean; the parts a
# protocol or classifier writes (lr, ncc, center, C..., raw) are described by it (vtbench.protocols).
VARIANT_NOTES = {
    "nol2": "features not L2-normalised",
    "classes-all": "episodes drawn from every class of the dataset",
}
_VARIANT_PATTERNS = (
    (re.compile(r"^(\d+)ep$"), lambda n: f"{n} episodes"),
    (re.compile(r"^q(\d+)$"), lambda n: f"{n} queries per class"),
    (re.compile(r"^classes-(\w+)$"), lambda subset: f"episodes drawn from the dataset's {subset} classes"),
    (re.compile(r"^splits-(.+)$"), lambda splits: "episodes drawn from splits " + ", ".join(splits.split("-"))),
    (re.compile(r"^file-([0-9a-f]+)$"), lambda sha: f"episodes replayed from a file (sha256 {sha}...)"),
)

_PATH_SUFFIXES = (".csv", ".tsv", ".json", ".txt")


@dataclass
class Cell:
    """One number of the table and where it came from."""

    value: float  # the mean over seeds where there are several
    ci95: float | None = None
    episodes: int | None = None
    splits: dict | None = None
    rank: float | None = None
    std: float | None = None  # sample standard deviation (n - 1) over seeds, with two or more
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # one per seed, in seed order


@dataclass
class Row:
    """One leaderboard row: everything that names a result except the dataset."""

    task: str
    model: str
    weights_source: str
    weights_sha256: str
    tokens: str
    protocol: str
    variant: str
    seeds: list[int] = field(default_factory=list)  # every seed of any cell, sorted
    cells: dict[str, Cell] = field(default_factory=dict)  # by canonical dataset spec
    features: str = ""  # FeatureSettings.id: the extraction settings of the caches
    features_label: str = ""  # the settings but the perturbation, which has its own column
    perturbation: str = ""  # its label; "" for clean features
    data: str = ""  # vtbench.results.data_id: which images ("" where not recorded)
    data_label: str = ""
    mean: float | None = None
    avg_rank: float | None = None
    partial: bool = False  # Mean and Avg rank cover fewer datasets than the table has

    @property
    def seed_label(self) -> str:
        return ",".join(map(str, self.seeds))

    @property
    def protocol_label(self) -> str:
        return f"{self.protocol}/{self.variant}" if self.variant else self.protocol

    @property
    def weights_label(self) -> str:
        return f"{short_source(self.weights_source, self.model) or 'weights'} {self.weights_sha256[:12]}"


@dataclass
class Section:
    """The table of one task under one metric."""

    task: str
    metric: str
    datasets: list[str]  # canonical specs, in column order
    labels: dict[str, str]  # canonical spec -> column header
    rows: list[Row]

    @property
    def has_ci(self) -> bool:
        return any(c.ci95 is not None for r in self.rows for c in r.cells.values())

    @property
    def show_weights(self) -> bool:
        """A weights column where a model appears with more than one set of weights, or any row is random-init
        (so that it never reads as pretrained)."""
        seen: dict[str, set[str]] = {}
        for row in self.rows:
            seen.setdefault(row.model, set()).add(row.weights_sha256)
        return any(len(s) > 1 for s in seen.values()) or any(
            row.weights_source.startswith("random-init") for row in self.rows)

    @property
    def show_features(self) -> bool:
        """A features column only where a model and weights appear with more than one extraction setting
        (the perturbation aside: :attr:`show_perturbation`)."""
        seen: dict[tuple, set[str]] = {}
        for row in self.rows:
            seen.setdefault((row.model, row.weights_sha256), set()).add(row.features_label)
        return any(len(s) > 1 for s in seen.values())

    @property
    def show_perturbation(self) -> bool:
        """A perturbation column wherever a row was computed on perturbed features."""
        return any(row.perturbation for row in self.rows)

    @property
    def show_data(self) -> bool:
        """A data column only where one model, weights and setting appear with results on other images
        (another root, a copy with other files): such cells are never merged into one."""
        seen: dict[tuple, set[str]] = {}
        for row in self.rows:
            seen.setdefault((row.model, row.weights_sha256, row.features), set()).add(row.data)
        return any(len(s) > 1 for s in seen.values())

    @property
    def show_seed(self) -> bool:
        return len({r.seed_label for r in self.rows}) > 1

    @property
    def has_seed_spread(self) -> bool:
        return any(c.std is not None for r in self.rows for c in r.cells.values())

    def row_label(self, row: Row) -> str:
        """One line naming a row (plot legends), with weights, features and seed only where the table shows them."""
        parts = [row.model, row.tokens, row.protocol_label]
        if self.show_weights:
            parts.append(row.weights_label)
        if self.show_features:
            parts.append(row.features_label)
        if self.show_perturbation:
            parts.append(row.perturbation or "clean")
        if self.show_data:
            parts.append(row.data_label)
        if self.show_seed:
            parts.append(f"seed {row.seed_label}")
        return " · ".join(parts)

    def best(self) -> dict[str, float]:
        """The best value of every column (datasets, 'mean' and 'avg_rank'), for bolding."""
        best = {d: max(r.cells[d].value for r in self.rows if d in r.cells) for d in self.datasets}
        means = [r.mean for r in self.rows if r.mean is not None]
        ranks = [r.avg_rank for r in self.rows if r.avg_rank is not None]
        if means:
            best["mean"] = max(means)
        if ranks:
            best["avg_rank"] = min(ranks)
        return best


@dataclass
class Leaderboard:
    """Tables (one :class:`Section` per task) plus the notes that say what each number is."""

    sections: list[Section]
    notes: list[str]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Leaderboard":
        """Inverse of :meth:`to_dict` (so a saved JSON leaderboard can be rendered again)."""
        sections = []
        for sec in data["sections"]:
            rows = [
                Row(**{**{k: v for k, v in row.items() if k != "seed"}, "seeds": row.get("seeds", [row.get("seed")]),
                       "cells": {d: Cell(**c) for d, c in row["cells"].items()}}) for row in sec["rows"]
            ]
            sections.append(Section(**{**sec, "rows": rows}))
        return cls(sections=sections, notes=list(data["notes"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        parts = []
        for sec in self.sections:
            parts.append(_section_markdown(sec))
        parts.append("**Notes**\n\n" + "\n".join(f"{i}. {note}" for i, note in enumerate(self.notes, 1)) + "\n")
        return "\n".join(parts)

    def to_csv(self) -> str:
        """One line per row with its full identity; the notes follow as ``#`` comment lines."""
        datasets: list[str] = []
        with_ci: set[str] = set()
        for sec in self.sections:
            for d in sec.datasets:
                if d not in datasets:
                    datasets.append(d)
                if sec.has_ci:
                    with_ci.add(d)
        identity = [
            "task", "metric", "model", "weights_source", "weights_sha256", "features", "features_label", "perturbation",
            "data", "tokens",
            "protocol", "variant", "seed_label",
        ]
        header = [("seeds" if k == "seed_label" else k) for k in identity]
        for d in datasets:
            header.append(d)
            if d in with_ci:
                header.append(f"{d} ci95")
        header += ["mean", "avg_rank"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for sec in self.sections:
            for row in sec.rows:
                line = [sec.task, sec.metric] + [getattr(row, k) for k in identity[2:]]
                for d in datasets:
                    cell = row.cells.get(d)
                    line.append("" if cell is None else repr(cell.value))
                    if d in with_ci:
                        line.append("" if cell is None or cell.ci95 is None else repr(cell.ci95))
                line += [_csv_number(row.mean), _csv_number(row.avg_rank)]
                writer.writerow(line)
        for note in self.notes:
            buf.write(f"# {note}\n")
        return buf.getvalue()


def _csv_number(x: float | None) -> str:
    return "" if x is None else repr(x)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _section_markdown(sec: Section) -> str:
    unit = f"{sec.metric} ± 95% CI (%)" if sec.has_ci else (
        sec.metric if sec.metric in FRACTION_METRICS else f"{sec.metric} (%)")
    if sec.has_seed_spread:
        unit += "; over several seeds (or trials): mean ± std" if sec.task == "robust" else \
            "; over several seeds: mean ± std over seeds"
    head = ["Model", "Tokens", "Protocol"]
    if sec.show_weights:
        head.append("Weights")
    if sec.show_features:
        head.append("Features")
    if sec.show_perturbation:
        head.append("Perturbation")
    if sec.show_data:
        head.append("Data")
    if sec.show_seed:
        head.append("Seed")
    id_cols = len(head)
    head += [sec.labels[d] for d in sec.datasets] + ["Mean", "Avg rank"]
    lines = [
        f"## {sec.task}: {unit}",
        "",
        "| " + " | ".join(_md_escape(h) for h in head) + " |",
        "|" + "---|" * id_cols + "---:|" * (len(head) - id_cols),
    ]
    best = sec.best()

    def bold_if(text: str, value: float | None, column: str) -> str:
        return f"**{text}**" if value is not None and value == best.get(column) else text

    for row in sec.rows:
        cols = [f"`{row.model}`", f"`{row.tokens}`", row.protocol_label]
        if sec.show_weights:
            cols.append(row.weights_label)
        if sec.show_features:
            cols.append(row.features_label)
        if sec.show_perturbation:
            cols.append(row.perturbation or "clean")
        if sec.show_data:
            cols.append(row.data_label)
        if sec.show_seed:
            cols.append(row.seed_label)
        for d in sec.datasets:
            cell = row.cells.get(d)
            if cell is None:
                cols.append(MISSING)
            else:
                spread = cell.std if cell.std is not None else cell.ci95
                digits = 1 if sec.metric not in FRACTION_METRICS else 3
                text = f"{cell.value:.{digits}f}" if spread is None else f"{cell.value:.{digits}f}±{spread:.{digits}f}"
                cols.append(bold_if(text, cell.value, d))
        mark = PARTIAL if row.partial else ""
        digits = 1 if sec.metric not in FRACTION_METRICS else 3
        cols.append(MISSING if row.mean is None else bold_if(f"{row.mean:.{digits}f}{mark}", row.mean, "mean"))
        cols.append(MISSING if row.avg_rank is None else bold_if(f"{row.avg_rank:.2f}{mark}", row.avg_rank, "avg_rank"))
        lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Labels


def short_source(source: str, model: str) -> str:
    """A weights source without directories or the model name: 'hub:timm/deit_s.fb_in1k' -> 'hub:fb_in1k',
    'pkg:NAME (file:/site-packages/.../x.pth)' -> 'pkg:NAME'."""
    source = source.split(" (", 1)[0]  # a package source names its resolved file in parentheses
    scheme, sep, rest = source.partition(":")
    if not sep or "/" not in rest:
        return source
    name = PurePosixPath(rest).name
    if name.startswith(model + "."):
        name = name[len(model) + 1 :]
    return f"{scheme}:{name}"


def _label_candidates(spec: str) -> list[str]:
    """Column headers for a dataset spec, from shortest to the full (always unique) spec."""
    name, sep, arg = spec.partition(":")
    if "/" in arg:
        parts = [p for p in PurePosixPath(arg).parts if p != "/"]
        last = parts[-1] if parts else arg
        for suffix in _PATH_SUFFIXES:
            if last.endswith(suffix) and len(last) > len(suffix):
                last = last[: -len(suffix)]
        candidates = [last] + ["/".join(parts[-k:]) for k in range(2, len(parts) + 1)]
    elif arg in ("", "1"):  # no argument, or the default split 1 (e.g. 'dtd:1')
        candidates = [name]
    else:
        candidates = []
    return candidates + [spec]


def dataset_labels(specs: list[str]) -> dict[str, str]:
    """Short, unambiguous column headers: 'dtd:1' -> 'dtd', 'imagefolder:/x/caltech101' -> 'caltech101'."""
    candidates = {s: _label_candidates(s) for s in specs}
    level = dict.fromkeys(specs, 0)
    while True:
        labels = {s: candidates[s][level[s]] for s in specs}
        by_label: dict[str, list[str]] = {}
        for s, lab in labels.items():
            by_label.setdefault(lab, []).append(s)
        clashes = [s for group in by_label.values() if len(group) > 1 for s in group]
        bumpable = [s for s in clashes if level[s] < len(candidates[s]) - 1]
        if not bumpable:
            return labels
        for s in bumpable:
            level[s] += 1


def variant_note(variant: str) -> str:
    """``variant: what it means``, one clause per ``+``-separated part (unknown parts: see the records)."""
    clauses = []
    for part in variant.split("+"):
        note = variant_part_note(part) or VARIANT_NOTES.get(part)
        for pattern, describe in _VARIANT_PATTERNS if note is None else ():
            m = pattern.match(part)
            if m:
                note = describe(m.group(1))
                break
        clauses.append(note or f"{part} (no description registered; see the records)")
    return f"{variant}: " + ", ".join(clauses)


def _splits_text(splits: dict | None) -> str:
    if not splits:
        return "unrecorded"
    order = ["train", "val", "test"]
    keys = [k for k in order if k in splits] + sorted(k for k in splits if k not in order)
    parts = []
    for k in keys:
        v = splits[k]
        parts.append(f"{k}=" + ("+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Building


def _canonical_tokens(text: str) -> str:
    try:
        return str(parse_spec(text))
    except VTError:
        return text


def is_per_block(tokens: str) -> bool:
    """Whether a token spec is one point of a per-block curve (``cls[3]``, ``patch[0]``, ``stage[2]``)."""
    try:
        spec = parse_spec(tokens)
    except VTError:
        return False
    if len(spec.terms) != 1:
        return False
    term = spec.terms[0]
    return term.single and term.kind in ("cls", "patch", "stage") and term.start >= 0


def _as_list(values) -> list | None:
    if values is None:
        return None
    return [values] if isinstance(values, str) else list(values)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _listing(values, limit: int = 12) -> str:
    """'a, b, c' for an error message, cut after ``limit`` items."""
    values = list(values)
    more = f", ... (+{len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


def dataset_names(spec: str) -> set[str]:
    """Every name a dataset spec answers to in filters: the spec and its short labels ('dtd' for 'dtd:1')."""
    return {spec, *_label_candidates(spec)}


def select_settings(table: ResultsTable, settings: SettingsQuery | None) -> ResultsTable:
    """The records computed on caches of the given extraction settings (VTError naming those there are, when none)."""
    if settings is None or not settings.given():
        return table
    kept = [r for r in table if settings.matches(r)]
    if not kept:
        have = sorted({FeatureSettings.of(r).label() for r in table})
        raise VTError(f"no results from caches with {settings} (there are: {_listing(have)})")
    return ResultsTable(kept, table.unreadable)


def _apply_filters(table: ResultsTable, *, protocols, tokens, models, datasets) -> tuple[ResultsTable, int]:
    """Filter records; returns the kept table and how many per-block records were left out by default."""
    records = list(table)
    for flag, wanted, key in (
        ("--protocol", protocols, lambda r: {r["protocol"]}),
        ("--models", models, lambda r: {r["model"]}),
        ("--tokens", None if tokens is None else [_canonical_tokens(t) for t in tokens],
         lambda r: {_canonical_tokens(r["tokens"])}),
        ("--datasets", datasets, lambda r: dataset_names(r["dataset"])),
    ):
        if wanted is None:
            continue
        kept = [r for r in records if key(r) & set(wanted)]
        if not kept:
            have = sorted({v for r in records for v in key(r)}) if flag != "--datasets" else sorted(
                {r["dataset"] for r in records}
            )
            raise VTError(f"no results match {flag} {','.join(wanted)} (available: {_listing(have)})")
        records = kept
    hidden = 0
    if tokens is None:
        shown = [r for r in records if not is_per_block(r["tokens"])]
        hidden = len(records) - len(shown)
        if not shown:
            raise VTError(
                "only per-block records (cls[i], patch[i], stage[i]) found; "
                "pass --tokens to list them or use 'vt plot per-block'"
            )
        records = shown
    return ResultsTable(records), hidden


def _metric_for(task: str, metric: str | None) -> str:
    return metric or DEFAULT_METRIC.get(task, "top1")


def _rank_section(rows: list[Row], datasets: list[str]) -> None:
    """Per-column ranks (1 = best, ties share the average rank), then each row's mean and average rank."""
    for d in datasets:
        values = [r.cells[d].value for r in rows if d in r.cells]
        for r in rows:
            if d in r.cells:
                v = r.cells[d].value
                higher = sum(x > v for x in values)
                equal = sum(x == v for x in values)
                r.cells[d].rank = higher + (equal + 1) / 2
    for r in rows:
        if r.cells:
            cells = [r.cells[d] for d in datasets if d in r.cells]
            r.mean = sum(c.value for c in cells) / len(cells)
            r.avg_rank = sum(c.rank for c in cells) / len(cells)
            r.partial = len(cells) < len(datasets)


def build_leaderboard(
    table: ResultsTable,
    *,
    protocols: list[str] | str | None = None,
    tokens: list[str] | str | None = None,
    models: list[str] | str | None = None,
    datasets: list[str] | str | None = None,
    metric: str | None = None,
    settings: SettingsQuery | None = None,
) -> Leaderboard:
    """Leaderboard of a results table, optionally filtered; raises VTError when nothing is left.

    Without ``tokens``, per-block records (``cls[3]`` ...) are left out (a note says how many):
    they are the points of ``vt plot per-block``. ``metric`` defaults to ``top1`` for probes and
    ``accuracy`` for few-shot; records without the metric are left out (a note says how many).
    ``datasets`` matches canonical specs or their short names ('dtd' for 'dtd:1'); ``settings`` keeps the
    results computed on caches of those extraction settings.
    """
    if len(table) == 0:
        raise VTError("no results to report")
    filtered, hidden_per_block = _apply_filters(
        select_settings(table, settings),
        protocols=_as_list(protocols),
        tokens=_as_list(tokens),
        models=_as_list(models),
        datasets=_as_list(datasets),
    )

    by_task: dict[str, list[dict]] = {}
    lacking: dict[str, int] = {}
    for rec in filtered:
        m = _metric_for(rec["task"], metric)
        if m in rec.get("metrics", {}):
            by_task.setdefault(rec["task"], []).append(rec)
        else:
            lacking[rec["task"]] = lacking.get(rec["task"], 0) + 1
    if not by_task:
        have = sorted({k for r in filtered for k in r.get("metrics", {})})
        asked = f"metric '{metric}'" if metric else "its default metric (top1 for probes, accuracy for few-shot)"
        raise VTError(f"no result has {asked} (available: {_listing(have)})")

    tasks = sorted(by_task, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))
    sections = [_build_section(task, _metric_for(task, metric), by_task[task]) for task in tasks]
    used = [r for task in tasks for r in by_task[task]]
    notes = _notes(sections, used, hidden_per_block, lacking, metric)
    if table.unreadable:
        notes.append(f"Not read: {_count(len(table.unreadable), 'file')} in the results store that "
                     f"{'is' if len(table.unreadable) == 1 else 'are'} not valid JSON: {_listing(table.unreadable, 3)}.")
    return Leaderboard(sections=sections, notes=notes)


def _build_section(task: str, metric: str, records: list[dict]) -> Section:
    """One row per result identity less the seed: a cell with several seeds shows their mean (± std)."""
    rows: dict[tuple, Row] = {}
    per_cell: dict[tuple, dict[int, dict]] = {}
    perturbations: dict[tuple, dict | None] = {}
    for rec in records:
        weights = rec.get("weights", {})
        settings = FeatureSettings.of(rec)
        features = settings.id
        data = data_id(rec) or ""
        key = (rec["model"], rec["tokens"], rec["protocol"], rec.get("variant", ""),
               weights.get("source", ""), weights["sha256"], features, data)
        if key not in rows:
            rows[key] = Row(task=task, model=rec["model"], weights_source=weights.get("source", ""),
                            weights_sha256=weights["sha256"], tokens=rec["tokens"], protocol=rec["protocol"],
                            variant=rec.get("variant", ""), features=features,
                            features_label=settings.label(perturbation=False),
                            perturbation=perturbation_label(settings.perturbation) if settings.perturbation else "",
                            data=data, data_label=data_label(rec))
        per_cell.setdefault((key, rec["dataset"]), {})[rec["seed"]] = rec
        perturbations[key] = settings.perturbation
    for (key, dataset), by_seed in per_cell.items():
        rows[key].cells[dataset] = _cell(task, metric, by_seed)
    for row in rows.values():
        row.seeds = sorted({s for c in row.cells.values() for s in c.seeds})
    specs = sorted({rec["dataset"] for rec in records})
    labels = dataset_labels(specs)
    columns = sorted(specs, key=lambda s: (labels[s], s))
    # The perturbation of a row sorts by its label, clean first (the features id is a hash).
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (tuple(str(x) for x in k[:6]), sort_key(perturbations[k]),
                                                            tuple(str(x) for x in k[6:])))]
    _rank_section(ordered, columns)
    return Section(task=task, metric=metric, datasets=columns, labels=labels, rows=ordered)


def _cell(task: str, metric: str, by_seed: dict[int, dict]) -> Cell:
    """The cell of one row and dataset: the metric of each seed's record, their mean and sample std."""
    seeds = sorted(by_seed)
    values = [float(by_seed[s]["metrics"][metric]) for s in seeds]
    first = by_seed[seeds[0]]["metrics"]
    with_ci = task == "fewshot" and metric == "accuracy" and "ci95" in first and len(seeds) == 1
    episodes = first.get("episodes")
    mean = sum(values) / len(values)
    std = None
    if len(values) > 1:
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    elif first.get(f"{metric}_std"):  # one seed of a random perturbation: the spread over its trials
        std = float(first[f"{metric}_std"])
    return Cell(value=mean, ci95=float(first["ci95"]) if with_ci else None,
                episodes=int(episodes) if episodes is not None else None,
                splits=by_seed[seeds[0]].get("splits"), std=std, seeds=seeds, values=values)


def _notes(sections: list[Section], records: list[dict], hidden_per_block: int, lacking: dict, metric) -> list[str]:
    notes = []
    for sec in sections:
        notes.append(f"{sec.task} cells: {sec.metric} = {METRIC_NOTES.get(sec.metric, 'as recorded in the results')}.")
        if sec.task == "robust":
            notes.append("robust cells: a probe fitted on the clean train (and val) features, scored on the clean test "
                         "features and on each perturbed test cache of the same images (vt robust accuracy); random "
                         "perturbations with several trials show mean ± std over the trials.")
    notes.append(
        f"{MISSING} = no result. Mean and Avg rank use only the datasets a row has; a rank is taken within "
        "a dataset column among the rows that have it (1 = best, ties share the average rank). Bold = best in column."
    )
    protocols = list(dict.fromkeys(
        protocol_note(p, sec.metric) for sec in sections for p in sorted({r.protocol for r in sec.rows})
    ))
    notes.append("Protocols: " + "; ".join(protocols) + ".")
    variants = sorted({r.get("variant", "") for r in records} - {""})
    if variants:
        notes.append("Variants: " + "; ".join(variant_note(v) for v in variants) + ".")

    weights = sorted({(r["model"], r["weights"].get("source", ""), r["weights"]["sha256"]) for r in records})
    notes.append(
        "Weights: "
        + "; ".join(f"{m} = {src or 'unrecorded source'} (sha256 {sha[:12]})" for m, src, sha in weights)
        + "."
    )
    settings: dict[tuple, tuple[set, str]] = {}
    perturbed: dict[str, set[str]] = {}
    for r in records:  # by settings and architecture: the norm setting means something else for CNNs
        full = FeatureSettings.of(r)
        clean = replace(full, perturbation=None)  # each perturbation is described once, in its own note
        models, _ = settings.setdefault((clean.id, str(r.get("arch"))),
                                        (set(), clean.label(full=True, arch=r.get("arch"))))
        models.add(r["model"])
        if full.perturbation:
            perturbed.setdefault(describe_perturbation(full.perturbation), set()).add(f"{r['model']} [{full.id}]")
    notes.append(
        "Features (extraction settings of the caches): "
        + "; ".join(f"{', '.join(sorted(m))} [{key[0]}]: {text}"
                    for key, (m, text) in sorted(settings.items(), key=lambda kv: sorted(kv[1][0])))
        + "."
    )
    if perturbed:
        notes.append("Perturbations (of those settings; docs/perturbations.md): "
                     + "; ".join(f"{text} ({', '.join(sorted(ids))})" for text, ids in sorted(perturbed.items())) + ".")
    seeds = sorted({r["seed"] for r in records})
    seed_sets = {tuple(c.seeds) for sec in sections for row in sec.rows for c in row.cells.values()}
    if len(seeds) == 1:
        notes.append(f"Seed: {seeds[0]} for every cell.")
    elif len(seed_sets) == 1:
        notes.append(f"Seeds: {', '.join(map(str, seeds))} for every cell; a cell is their mean ± sample std (n-1).")
    else:
        notes.append(f"Seeds: {', '.join(map(str, seeds))} (see the Seed column); a cell with several is their "
                     "mean ± sample std (n-1).")
    if any(row.partial for sec in sections for row in sec.rows):
        notes.append(f"{PARTIAL} = Mean and Avg rank over only the datasets that row has, fewer than its table's; "
                     "not comparable with full rows.")

    episodes: dict[str, set] = {}
    for r in records:
        if "episodes" in r.get("metrics", {}):
            proto = f"{r['protocol']}/{r['variant']}" if r.get("variant") else r["protocol"]
            episodes.setdefault(proto, set()).add(int(r["metrics"]["episodes"]))
    if episodes:
        notes.append(
            "Episodes per cell: "
            + "; ".join(f"{p} {' or '.join(map(str, sorted(n)))}" for p, n in sorted(episodes.items()))
            + "."
        )

    labels = dataset_labels(sorted({r["dataset"] for r in records}))
    split_parts = []
    for spec in sorted(labels, key=lambda s: (labels[s], s)):
        uses: dict[str, set] = {}
        for r in records:
            if r["dataset"] == spec:
                uses.setdefault(_splits_text(r.get("splits")), set()).add(r["protocol"])
        name = labels[spec] if labels[spec] == spec else f"{labels[spec]} ({spec})"
        if len(uses) == 1:
            split_parts.append(f"{name}: {next(iter(uses))}")
        else:
            split_parts.append(
                f"{name}: " + " | ".join(f"{text} [{', '.join(sorted(p))}]" for text, p in sorted(uses.items()))
            )
    notes.append("Datasets and splits: " + "; ".join(split_parts) + ".")

    skipped = {}
    for r in records:
        for refs in (r.get("caches") or {}).values():
            for ref in refs:
                if ref.get("n_skipped"):
                    total = ref["rows"] + ref["n_skipped"]
                    ids = ", ".join(ref.get("skipped", [])) + (", ..." if ref["n_skipped"] > len(ref.get("skipped", [])) else "")
                    skipped[(labels[r["dataset"]], ref["split"], ref.get("data_fingerprint"))] = (
                        f"{labels[r['dataset']]}: {ref['n_skipped']} of {total} {ref['split']} images unreadable, left out "
                        f"({ids}; root {ref.get('dataset_root')})")
    if skipped:
        notes.append("Skipped images: " + "; ".join(text for _, text in sorted(skipped.items())) + ".")
    decisive = {id(r): convergence_note(r, decisive_only=True) for r in records}
    unconverged = [f"{r['model']} {r['tokens']} {r['protocol']} on {labels[r['dataset']]}: {decisive[id(r)]}"
                   for r in records if decisive[id(r)]]
    if unconverged:
        notes.append("Not converged (the solver's criterion was not met where it decides the number): "
                     + "; ".join(sorted(unconverged)) + ".")
    versions = sorted({str(r.get("versions", {}).get("vtbench", "unrecorded")) for r in records})
    notes.append(f"vtbench version{'s' if len(versions) > 1 else ''}: {', '.join(versions)}.")
    if hidden_per_block:
        notes.append(
            f"Not shown: {_count(hidden_per_block, 'per-block record')} (cls[i], patch[i], stage[i]); "
            "see 'vt plot per-block' or pass --tokens."
        )
    for task, n in sorted(lacking.items()):
        notes.append(f"Not shown: {_count(n, task + ' record')} without metric {_metric_for(task, metric)}.")
    return notes


def load_results(results_dir: str | os.PathLike) -> ResultsTable:
    """Load a results directory; VTError when it is missing or holds no results."""
    root = Path(results_dir)
    if root.is_file():
        raise VTError(f"{root} is a file, not a results folder (give the folder that holds the result files)")
    if not root.is_dir():
        raise VTError(f"results directory {root} does not exist")
    table = load(root)
    if len(table) == 0:
        raise VTError(f"no vtbench results under {root}")
    return table


def leaderboard_from_dir(results_dir: str | os.PathLike, **filters) -> Leaderboard:
    """:func:`build_leaderboard` of a results directory (filters as there)."""
    return build_leaderboard(load_results(results_dir), **filters)

