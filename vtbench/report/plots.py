"""Figures from the results store: ``vt plot per-block`` and ``vt plot bars``.

Both functions draw on a bare :class:`matplotlib.figure.Figure` (PNG through the
Agg renderer, no pyplot state), save it to ``out`` and return it, so callers and
tests can read back exactly what was plotted.
"""

from __future__ import annotations

import os
from pathlib import Path

from vtbench.errors import VTError
from vtbench.report.leaderboard import build_leaderboard, select_settings, dataset_labels, dataset_names, is_per_block, short_source
from vtbench.results import ResultsTable, data_id, data_label
from vtbench.settings import FeatureSettings, SettingsQuery
from vtbench.tokens import parse_spec

# A bar chart with more rows than this is unreadable: narrow it with filters instead.
MAX_BAR_ROWS = 20  # tab10 x hatches keeps every series distinct; beyond this the legend outgrows the chart
LINE_STYLES = {"cls": "-", "patch": "--", "stage": ":"}
BAR_TASKS = ("probe", "fewshot")  # the robustness tables have plots of their own (plot_robustness, plot_cka)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out)
    except ValueError as exc:  # e.g. an unknown file extension
        raise VTError(f"cannot save figure to {out}: {exc}") from None


def _pick_dataset(records: list[dict], dataset: str) -> str:
    specs = sorted({r["dataset"] for r in records if dataset in dataset_names(r["dataset"])})
    if not specs:
        have = sorted({r["dataset"] for r in records})
        raise VTError(f"no per-block probe results for dataset '{dataset}' (have: {', '.join(have) or 'none'})")
    if len(specs) > 1:
        raise VTError(f"dataset '{dataset}' is ambiguous: {', '.join(specs)}; pass the full spec")
    return specs[0]


def plot_per_block(
    table: ResultsTable,
    dataset: str,
    out: str | os.PathLike,
    models: list[str] | None = None,
    protocol: str = "default",
    metric: str = "top1",
    settings: SettingsQuery | None = None,
):
    """Metric of single-block probes (``cls[i]``, ``patch[i]``, ``stage[i]``) against block index.

    One line per model (and weights, variant and seed, where several exist) and token kind.
    Returns the saved matplotlib Figure.
    """
    candidates = [
        r
        for r in select_settings(table, settings)
        if r["task"] == "probe"
        and r["protocol"] == protocol
        and is_per_block(r["tokens"])
        and metric in r.get("metrics", {})
    ]
    if not candidates:
        raise VTError(
            f"no per-block probe results (cls[i], patch[i], stage[i]) with protocol '{protocol}' and metric "
            f"'{metric}'; make them with 'vt probe --per-block'"
        )
    spec = _pick_dataset(candidates, dataset)
    records = [r for r in candidates if r["dataset"] == spec]
    if models:
        records = [r for r in records if r["model"] in models]
        if not records:
            have = sorted({r["model"] for r in candidates if r["dataset"] == spec})
            raise VTError(f"no per-block results for models {', '.join(models)} on {spec} (have: {', '.join(have)})")

    series: dict[tuple, dict[int, float]] = {}
    feature_labels: dict[tuple, tuple[str, str]] = {}
    for rec in records:
        term = parse_spec(rec["tokens"]).terms[0]
        weights = rec["weights"]
        # Results on other images (another root) are other series, never points of one curve.
        features = (FeatureSettings.of(rec).id, data_id(rec) or "")
        feature_labels[features] = (FeatureSettings.of(rec).label(), data_label(rec))
        group = (rec["model"], weights["sha256"], weights.get("source", ""), rec.get("variant", ""), rec["seed"], features)
        series.setdefault(group + (term.kind,), {})[term.start] = float(rec["metrics"][metric])

    weights_per_model: dict[str, set] = {}
    features_per_weights: dict[tuple, set] = {}
    for model, sha, _, _, _, features, _ in series:
        weights_per_model.setdefault(model, set()).add(sha)
        features_per_weights.setdefault((model, sha), set()).add(features)
    seeds = {key[4] for key in series}

    def label(key: tuple) -> str:
        model, sha, source, variant, seed, features, kind = key
        parts = [model]
        if len(weights_per_model[model]) > 1:
            parts.append(f"{short_source(source, model) or 'weights'} {sha[:12]}")
        settings = features_per_weights[(model, sha)]
        settings_text, data_text = feature_labels[features]
        if len({f for f, _ in settings}) > 1:  # name only what differs: the settings, the data, or both
            parts.append(settings_text)
        if len({d for _, d in settings}) > 1:
            parts.append(data_text)
        if variant:
            parts.append(variant)
        if len(seeds) > 1:
            parts.append(f"seed {seed}")
        return " · ".join(parts) + f" · {kind}"

    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    colors = {}
    for key in sorted(series, key=lambda k: tuple(map(str, k))):
        color = colors.setdefault(key[:6], f"C{len(colors) % 10}")
        points = sorted(series[key].items())
        ax.plot(
            [b for b, _ in points],
            [v for _, v in points],
            LINE_STYLES.get(key[6], "-"),
            marker="o",
            markersize=4,
            color=color,
            label=label(key),
        )
    name = dataset_labels([spec])[spec]
    return _finish_block_axes(fig, ax, out, "block (CNNs: stage)" if any(k[6] == "stage" for k in series) else "block",
                              f"{metric} (%)", f"{name}{'' if name == spec else f' ({spec})'}: per-block {metric}, "
                              f"protocol {protocol}")


def _finish_block_axes(fig, ax, out, xlabel: str, ylabel: str, title: str, **title_style):
    """Labels, integer block ticks, grid, the legend below the axes (curves fill them), title; saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title(title, **title_style)
    _save(fig, out)
    return fig


def _series_styles(n: int) -> tuple[list, list[str]]:
    """A distinct (colour, hatch) for each of ``n`` bar series: tab10's colours, then again with hatches
    (matplotlib's own cycle repeats after 10, so two series looked the same)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    hatches = ["", "//", "..", "xx", "\\\\"]
    return ([palette[i % len(palette)] for i in range(n)],
            [hatches[(i // len(palette)) % len(hatches)] for i in range(n)])


def plot_bars(
    table: ResultsTable,
    out: str | os.PathLike,
    *,
    models: list[str] | str | None = None,
    tokens: list[str] | str | None = None,
    protocols: list[str] | str | None = None,
    datasets: list[str] | str | None = None,
    metric: str | None = None,
    settings: SettingsQuery | None = None,
):
    """Grouped bars: the leaderboard's rows (same filters) side by side for each dataset.

    One panel per task; few-shot bars carry their 95% CI as error bars. Returns the saved Figure.
    """
    import numpy as np

    table = ResultsTable([r for r in table if r["task"] in BAR_TASKS], table.unreadable)
    board = build_leaderboard(
        table, models=models, tokens=tokens, protocols=protocols, datasets=datasets, metric=metric, settings=settings
    )
    for sec in board.sections:
        if len(sec.rows) > MAX_BAR_ROWS:
            raise VTError(
                f"{len(sec.rows)} {sec.task} rows are too many for one bar chart (at most {MAX_BAR_ROWS}); "
                "narrow them with --models, --tokens or --protocol"
            )
    widest = max(len(sec.datasets) * len(sec.rows) for sec in board.sections)
    # Legends go under their panel, one row per bar series.
    heights = [3.5 + 0.22 * len(sec.rows) for sec in board.sections]
    fig = _new_figure(max(7.0, 1.5 + 0.35 * widest), sum(heights))
    axes = fig.subplots(len(board.sections), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, sec in zip(axes, board.sections):
        x = np.arange(len(sec.datasets))
        width = 0.8 / len(sec.rows)
        colors, hatches = _series_styles(len(sec.rows))
        shown = []
        for i, row in enumerate(sec.rows):
            cells = [row.cells.get(d) for d in sec.datasets]
            heights = [np.nan if c is None else c.value for c in cells]
            spreads = [np.nan if c is None or (c.std is None and c.ci95 is None)
                       else (c.std if c.std is not None else c.ci95) for c in cells]
            errors = None if np.isnan(spreads).all() else spreads
            bars = ax.bar(x - 0.4 + (i + 0.5) * width, heights, width, yerr=errors, capsize=3 if errors else 0,
                          label=sec.row_label(row), color=colors[i], hatch=hatches[i], edgecolor="0.25",
                          linewidth=0.5)
            ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.1f}" for h in heights], fontsize=7,
                         padding=1, rotation=90 if len(sec.rows) > 6 else 0)
            shown += [h for h in heights if not np.isnan(h)]
        ax.set_xticks(x, [sec.labels[d] for d in sec.datasets])
        ax.set_ylabel(f"{sec.metric} (%)")
        low, high = min(shown), max(shown)
        # Start where the data are (differences of a few points are what the chart is for), not at 0.
        pad = max(1.0, 0.1 * (high - low))
        ax.set_ylim(max(0.0, low - 2 * pad), min(100.0, high + 2 * pad) if high <= 100 else high + 2 * pad)
        ax.grid(True, axis="y", alpha=0.3)
        spread = [name for name, shown in (("95% CI", sec.has_ci), ("std over seeds", sec.has_seed_spread)) if shown]
        ci = f", error bars: {' or '.join(spread)}" if spread else ""
        ax.set_title(f"{sec.task}: {sec.metric}{ci}")
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12))
    _save(fig, out)
    return fig


# ------------------------------------------------------------------------------------------ robustness


def _robust_records(table: ResultsTable, task: str, dataset: str, models, what: str) -> tuple[list[dict], str]:
    candidates = [r for r in table if r["task"] == task]
    if not candidates:
        raise VTError(f"no {task} results; make them with 'vt robust {what}'")
    spec = _pick_dataset(candidates, dataset)
    records = [r for r in candidates if r["dataset"] == spec and (not models or r["model"] in models)]
    if not records:
        raise VTError(f"no {task} results for models {', '.join(models)} on {spec}")
    return records, spec


def _title(spec: str, text: str) -> str:
    name = dataset_labels([spec])[spec]
    return f"{name}{'' if name == spec else f' ({spec})'}: {text}"


def plot_robustness(table: ResultsTable, dataset: str, out, models: list[str] | None = None, metric: str = "top1"):
    """Accuracy under perturbation (``vt robust accuracy``): against the drop ratio (random PatchDrop) or the
    attention mass (salient, non-salient), one line per model, token spec, protocol and mode (the shape of
    IPViT's Fig. 3), and against the shuffle grid size. The clean accuracy is each line's point at 0."""
    records, spec = _robust_records(table, "robust", dataset, models, "accuracy")
    drop: dict[tuple, dict[float, tuple[float, float]]] = {}
    shuffle: dict[tuple, dict[int, float]] = {}
    clean = {}
    for r in records:
        key = (r["model"], r["weights"]["sha256"][:12], r["tokens"], r["protocol"])
        value, spread = float(r["metrics"][metric]), float(r["metrics"].get(f"{metric}_std", 0.0))
        p = r.get("perturbation")
        if not p:
            clean[key] = value
        elif p["kind"] == "patchdrop":
            amount = p["ratio"] if p["mode"] == "random" else p["mass"]
            drop.setdefault(key + (p["mode"],), {})[amount] = (value, spread)
        elif p["kind"] == "shuffle":
            shuffle.setdefault(key, {})[p["grid"]] = value
    if not drop and not shuffle:
        raise VTError(f"no PatchDrop or shuffle results on {spec}; extract with --perturb patchdrop:random:R or "
                      "shuffle:G, then run 'vt robust accuracy'")
    panels = [p for p, series in (("drop", drop), ("shuffle", shuffle)) if series]
    fig = _new_figure(6.5 * len(panels), 5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    names = {k[0] for k in clean} | {k[0] for k in drop} | {k[0] for k in shuffle}
    def line_label(key):
        return " · ".join(([key[0]] if len(names) > 1 else []) + [key[2], key[3]] + list(key[4:]))

    for ax, panel in zip(axes, panels):
        series = drop if panel == "drop" else shuffle
        for i, key in enumerate(sorted(series)):
            points = dict(series[key])
            if key[:4] in clean:
                points.setdefault(0 if panel == "drop" else 1, (clean[key[:4]], 0.0) if panel == "drop" else clean[key[:4]])
            xs = sorted(points)
            ys = [points[x][0] if panel == "drop" else points[x] for x in xs]
            style = {"random": "-", "salient": "--", "nonsalient": ":"}.get(key[4] if panel == "drop" else "", "-")
            ax.plot(xs, ys, style, marker="o", markersize=4, color=f"C{i % 10}", label=line_label(key))
            if panel == "drop":
                errs = [points[x][1] for x in xs]
                if any(errs):
                    ax.errorbar(xs, ys, yerr=errs, fmt="none", color=f"C{i % 10}", capsize=3)
        ax.set_xlabel("fraction dropped (random: of the cells; salient / non-salient: of the attention mass)"
                      if panel == "drop" else "shuffle grid (G x G pieces; 1 = clean)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax.set_title(_title(spec, "PatchDrop" if panel == "drop" else "patch shuffle"), fontsize=10)
    _save(fig, out)
    return fig


def plot_lesions(table: ResultsTable, dataset: str, out, models: list[str] | None = None, metric: str = "top1"):
    """The lesion study: the accuracy drop of a clean-trained probe when one block, its attention or its MLP
    branch is removed, against the block's depth (one line per model, token spec, protocol and part)."""
    records, spec = _robust_records(table, "robust", dataset, models, "accuracy --kinds lesion")
    clean, drops = {}, {}
    for r in records:
        key = (r["model"], r["tokens"], r["protocol"])
        p = r.get("perturbation")
        if not p:
            clean[key] = float(r["metrics"][metric])
        elif p["kind"] == "lesion" and "stage" not in p:
            drops.setdefault(key + (p["part"],), {})[p["block"]] = float(r["metrics"][metric])
    if not drops:
        raise VTError(f"no ViT lesion results on {spec}; extract with --perturb lesion:attn:I (mlp, block) and run "
                      "'vt robust accuracy --kinds lesion'")
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    for i, key in enumerate(sorted(drops)):
        base = clean.get(key[:3])
        if base is None:
            continue
        xs = sorted(drops[key])
        style = {"attn": "-", "mlp": "--", "block": ":"}[key[3]]
        ax.plot(xs, [base - drops[key][x] for x in xs], style, marker="o", markersize=4, color=f"C{i % 10}",
                label=" · ".join(key))
    return _finish_block_axes(fig, ax, out, "block removed (depth)", f"{metric} drop from clean (points)",
                              _title(spec, "lesions (attention against MLP against whole block)"), fontsize=10)


def plot_stability(table: ResultsTable, dataset: str, out, models: list[str] | None = None, measure: str = "pearson"):
    """Feature stability (``vt robust stability``): per block, the mean correlation of clean and perturbed
    features, one line per perturbation (and model and token kind)."""
    from vtbench.perturb.spec import label

    records, spec = _robust_records(table, "stability", dataset, models, "stability")
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    names = {r["model"] for r in records}
    for i, r in enumerate(sorted(records, key=lambda r: (r["model"], r["tokens"], label(r.get("perturbation"))))):
        values = r["per_block"][measure]
        text = " · ".join(([r["model"]] if len(names) > 1 else []) + [r["tokens"], label(r.get("perturbation"))])
        ax.plot(range(len(values)), values, LINE_STYLES.get(r["tokens"], "-"), marker="o", markersize=3,
                color=f"C{i % 10}", label=text)
    return _finish_block_axes(fig, ax, out, "block", f"mean {measure} (clean vs perturbed)",
                              _title(spec, "feature stability per block"), fontsize=10)


def plot_cka(table: ResultsTable, dataset: str, out, model: str | None = None, tokens: str | None = None,
             estimator: str = "biased"):
    """The block x block linear CKA heatmap of ``vt robust cka`` (Bhojanapalli et al.'s layer correlation)."""
    import numpy as np

    records, spec = _robust_records(table, "cka", dataset, [model] if model else None, "cka")
    if tokens:
        records = [r for r in records if r["tokens"] == tokens]
    if not records:
        raise VTError(f"no CKA results for {tokens} on {spec}")
    fig = _new_figure(5.2 * len(records), 4.8)
    axes = fig.subplots(1, len(records), squeeze=False)[0]
    for ax, r in zip(axes, records):
        matrix = np.asarray(r["cka"][estimator])
        rows = r["cka"]["rows"]
        shown = matrix[:rows, rows:] if r.get("other") else matrix
        image = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_ylabel(f"{r['model']} {r['tokens']} block")
        ax.set_xlabel(f"{r['other']['model']} {r['other']['tokens']}" if r.get("other") else f"{r['tokens']} block")
        ax.set_title(f"{r['model']} · {r['tokens']}" + (f" vs {r['other']['model']}" if r.get("other") else ""),
                     fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label=f"linear CKA ({estimator})")
    fig.suptitle(_title(spec, "layer similarity"), fontsize=10)
    _save(fig, out)
    return fig
