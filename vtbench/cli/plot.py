"""`vt plot per-block | bars`: PNG figures of the results store."""

from __future__ import annotations

from pathlib import Path

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from, split_list
from vtbench.options import REQUIRED, Opt
from vtbench.report.leaderboard import LEADERBOARD_OPTIONS
from vtbench.settings import SELECT_OPTIONS

plot_app = typer.Typer(help="Figures of the results store (PNG).", no_args_is_help=True)
app.add_typer(plot_app, name="plot")

_SHARED = {o.name: o for o in LEADERBOARD_OPTIONS}  # the same filters as the leaderboard
_SETTINGS = tuple(_SHARED[o.name] for o in SELECT_OPTIONS)
_OUT = Opt("out", Path, REQUIRED, "Output image (.png).", short="-o")

PER_BLOCK_OPTIONS = (
    _SHARED["results_dir"],
    Opt("dataset", str, REQUIRED, "Dataset spec or short name (e.g. dtd).", short="-d"),
    _OUT,
    _SHARED["models"],
    Opt("protocol", str, "default", "Probe protocol of the per-block records.", short="-p"),
    Opt("metric", str, "top1", "Metric on the y axis."),
    *_SETTINGS,
)
BARS_OPTIONS = (
    _SHARED["results_dir"], _OUT, _SHARED["models"], _SHARED["tokens"], _SHARED["protocol"], _SHARED["datasets"],
    Opt("metric", str, None, "Metric (default: top1 / few-shot accuracy)."),
    *_SETTINGS,
)


def _table(values: dict):
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.report.leaderboard import load_results

    return load_results(default_results_dir(values["results_dir"]))


def per_block(**values) -> None:
    """Accuracy of each block's cls / patch / stage token, block by block."""
    from vtbench.report.plots import plot_per_block
    from vtbench.settings import SettingsQuery

    plot_per_block(_table(values), values["dataset"], values["out"], models=split_list(values["models"]),
                   protocol=values["protocol"], metric=values["metric"], settings=SettingsQuery.from_options(values))
    typer.echo(f"wrote {values['out']}")


def bars(**values) -> None:
    """Grouped bars: leaderboard rows side by side per dataset (few-shot with 95% CI error bars)."""
    from vtbench.report.plots import plot_bars
    from vtbench.settings import SettingsQuery

    plot_bars(_table(values), values["out"], models=split_list(values["models"]), tokens=split_list(values["tokens"]),
              protocols=split_list(values["protocol"]), datasets=split_list(values["datasets"]),
              metric=values["metric"], settings=SettingsQuery.from_options(values))
    typer.echo(f"wrote {values['out']}")


command_from(plot_app, "per-block", PER_BLOCK_OPTIONS, per_block, multi_value=False)
command_from(plot_app, "bars", BARS_OPTIONS, bars, multi_value=False)

_DATASET = Opt("dataset", str, REQUIRED, "Dataset spec or short name (e.g. dtd).", short="-d")
ROBUST_PLOT_OPTIONS = (_SHARED["results_dir"], _DATASET, _OUT, _SHARED["models"],
                       Opt("metric", str, "top1", "Metric on the y axis."))
CKA_PLOT_OPTIONS = (_SHARED["results_dir"], _DATASET, _OUT,
                    Opt("model", str, None, "The model (default: every model with CKA results).", short="-m"),
                    Opt("tokens", str, None, "Token kind (cls, patch, stage; default: all).", short="-t"),
                    Opt("estimator", str, "biased", "biased or debiased."))


def robust(**values) -> None:
    """Accuracy under PatchDrop (against the fraction dropped) and patch shuffle (against the grid)."""
    from vtbench.report.plots import plot_robustness

    plot_robustness(_table(values), values["dataset"], values["out"], models=split_list(values["models"]),
                    metric=values["metric"])
    typer.echo(f"wrote {values['out']}")


def lesions(**values) -> None:
    """The lesion study: accuracy drop per removed block, attention against MLP against whole block."""
    from vtbench.report.plots import plot_lesions

    plot_lesions(_table(values), values["dataset"], values["out"], models=split_list(values["models"]),
                 metric=values["metric"])
    typer.echo(f"wrote {values['out']}")


def stability(**values) -> None:
    """Feature stability: clean-vs-perturbed correlation per block, one line per perturbation."""
    from vtbench.report.plots import plot_stability

    plot_stability(_table(values), values["dataset"], values["out"], models=split_list(values["models"]))
    typer.echo(f"wrote {values['out']}")


def cka(**values) -> None:
    """The block x block linear CKA heatmap."""
    from vtbench.report.plots import plot_cka

    plot_cka(_table(values), values["dataset"], values["out"], model=values["model"], tokens=values["tokens"],
             estimator=values["estimator"])
    typer.echo(f"wrote {values['out']}")


command_from(plot_app, "robust", ROBUST_PLOT_OPTIONS, robust, multi_value=False)
command_from(plot_app, "lesions", ROBUST_PLOT_OPTIONS, lesions, multi_value=False)
command_from(plot_app, "stability", ROBUST_PLOT_OPTIONS[:-1], stability, multi_value=False)
command_from(plot_app, "cka", CKA_PLOT_OPTIONS, cka, multi_value=False)
