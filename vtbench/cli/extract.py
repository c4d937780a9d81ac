"""`vt extract`: run frozen timm models over a dataset once and cache every block's tokens."""

from __future__ import annotations

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from, parse_model_kwargs, split_list, weights_choice
from vtbench.extract.run import EXTRACT_OPTIONS


def extract(**values) -> None:
    """Extract per-block class tokens, mean patch tokens (or pooled CNN stages) and pre-logits into HDF5 caches."""
    from vtbench.extract import extract as run_extract
    from vtbench.options import api_kwargs

    values["weights"] = weights_choice(values.pop("pretrained"), values.pop("checkpoint"), values.pop("random_init"))
    values["model_kwargs"] = parse_model_kwargs(values["model_kwargs"])
    values["split"] = split_list(values["split"])
    values["kinds"] = split_list(values["kinds"])
    values["mean"], values["std"] = _floats(values["mean"], "--mean"), _floats(values["std"], "--std")
    args = api_kwargs(EXTRACT_OPTIONS, values)
    reports = run_extract(args.pop("model"), args.pop("dataset"), args.pop("split"), args.pop("root"), **args)
    for report in reports:
        typer.echo(report.summary())
        for image_id, error in report.skipped:
            typer.echo(f"  skipped {image_id}: {error}")


def _floats(text: str | None, option: str):
    if text is None:
        return None
    from vtbench.errors import VTError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VTError(f"{option} takes comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) != 3:
        raise VTError(f"{option} needs three values (one per RGB channel)")
    return values


command_from(app, "extract", EXTRACT_OPTIONS, extract)
