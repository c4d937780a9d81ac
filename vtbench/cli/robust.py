"""`vt robust accuracy | stability | cka`: the papers' robustness analyses on cached features (docs/robustness.md)."""

from __future__ import annotations

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from, split_list
from vtbench.robust.run import ACCURACY_OPTIONS, CKA_OPTIONS, STABILITY_OPTIONS

robust_app = typer.Typer(help="Robustness analyses on cached features: accuracy under perturbation, feature "
                              "stability, layer CKA. Nothing is extracted: missing caches are named.",
                         no_args_is_help=True)
app.add_typer(robust_app, name="robust")


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def accuracy(**values) -> None:
    """A probe fitted on clean features, scored on the clean and every perturbed test cache (one fit)."""
    from vtbench.options import api_kwargs
    from vtbench.perturb.spec import label
    from vtbench.robust import run_accuracy

    for name in ("tokens", "protocol", "perturb", "kinds"):
        values[name] = split_list(values[name])
    records = run_accuracy(**api_kwargs(ACCURACY_OPTIONS, values), log=_echo)
    for rec in records:
        m = rec["metrics"]
        spread = f" ± {m['top1_std']:.2f} over {len(m['top1_trials'])} trials" if len(m["top1_trials"]) > 1 else ""
        state = " (stored)" if rec.get("skipped") else ""
        typer.echo(f"{rec['protocol']:8s} {rec['tokens']:16s} {label(rec.get('perturbation')):34s} top1 "
                   f"{m['top1']:6.2f}{spread}  relative {m['relative']:.3f}{state}")


def stability(**values) -> None:
    """Per block: the mean correlation of each image's clean and perturbed feature."""
    from vtbench.options import api_kwargs
    from vtbench.perturb.spec import label
    from vtbench.robust import run_stability

    for name in ("perturb", "kinds"):
        values[name] = split_list(values[name])
    for rec in run_stability(**api_kwargs(STABILITY_OPTIONS, values), log=_echo):
        blocks = " ".join(f"{v:.2f}" for v in rec["per_block"]["pearson"])
        typer.echo(f"{label(rec['perturbation']):34s} {rec['tokens']:6s} Pearson by block: {blocks}")


def cka(**values) -> None:
    """Linear CKA between every pair of blocks (and another model's), streamed over the cache."""
    from vtbench.options import api_kwargs
    from vtbench.robust import run_cka

    values["kinds"] = split_list(values["kinds"])
    for rec in run_cka(**api_kwargs(CKA_OPTIONS, values), log=_echo):
        m = rec["metrics"]
        typer.echo(f"{rec['model']} {rec['tokens']} {rec['variant'] or ''}: {len(rec['cka']['biased'])} blocks, "
                   f"consecutive blocks {m['adjacent_cka']:.3f}, first vs last {m['first_last_cka']:.3f} "
                   f"-> {rec['_path']}")


command_from(robust_app, "accuracy", ACCURACY_OPTIONS, accuracy)
command_from(robust_app, "stability", STABILITY_OPTIONS, stability)
command_from(robust_app, "cka", CKA_OPTIONS, cka)
