"""`vt models`: find timm models, or inspect one (blocks, dims per token kind, prefix tokens, transforms)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import parse_model_kwargs


@app.command()
def models(
    pattern: Optional[str] = typer.Argument(
        None, metavar="[PATTERN|NAME]", help="Wildcard over timm names ('deit*', 'vit_small*'; a bare word matches anywhere), or an exact model name to inspect."
    ),
    pretrained: bool = typer.Option(False, "--pretrained", help="List only names with pretrained weights, as arch.tag."),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help='JSON passed to timm.create_model when inspecting, e.g. \'{"img_size": 64}\'.'),
    as_json: bool = typer.Option(False, "--json", help="Print the inspection as JSON."),
) -> None:
    """List the paper's models, search timm's, or inspect one (built on the meta device: nothing is downloaded)."""
    from vtbench.errors import VTError
    from vtbench.models import describe_model, find_models
    from vtbench.models.catalog import PAPER_MODELS, is_model_name

    if pattern and is_model_name(pattern):
        info = describe_model(pattern, parse_model_kwargs(model_kwargs))
        typer.echo(json.dumps(info, indent=2) if as_json else _format_description(info))
        return
    if model_kwargs or as_json:
        raise VTError("--model-kwargs and --json apply when inspecting one model: vt models NAME")
    names = find_models(pattern, pretrained=pretrained)
    if not pattern:
        for name in names:
            typer.echo(f"{name:<36} {PAPER_MODELS[name]}")
        typer.echo("\nSearch timm with 'vt models PATTERN' (e.g. 'deit*', --pretrained for weights); inspect one with 'vt models NAME'.")
        return
    if not names:
        raise VTError(f"no timm model matches '{pattern}'{' with pretrained weights' if pretrained else ''}")
    for name in names:
        typer.echo(name)


def _dims(dims: list[int]) -> str:
    if len(set(dims)) == 1:
        return f"{len(dims)} x {dims[0]}"
    return f"{len(dims)}: {', '.join(map(str, dims))}"


def _format_transform(desc: dict) -> str:
    size = "x".join(map(str, desc["input_size"][1:]))
    crop = f"crop_pct {desc['crop_pct']} ({desc['crop_mode']})" if desc["crop_pct"] is not None else "no crop"
    return f"{size}, {desc['interpolation']}, {crop}, mean {tuple(desc['mean'])}, std {tuple(desc['std'])}"


def _format_description(info: dict) -> str:
    lines = [f"{info['name']}: {info['arch']}, {info['params'] / 1e6:.1f}M parameters"]
    if info["arch"] == "vit":
        parts = ", ".join(f"{kind} {count}" for kind, count in info["prefix_tokens"].items())
        lines.append(f"  prefix tokens:   {info['num_prefix_tokens']} ({parts}); 'patch' averages the other tokens")
    lines.append("  features (blocks x dim):")
    for kind, dims in info["dims"].items():
        lines.append(f"    {kind:<10} {_dims(dims)}")
    lines.append(f"  transform model: {_format_transform(info['transform'])}")
    lines.append(f"  transform ipvit: {_format_transform(info['ipvit_transform'])}")
    tags = info["pretrained_tags"]
    lines.append(f"  pretrained tags: {', '.join(tags) if tags else 'none (use --checkpoint or --random-init)'}")
    examples = "cls[-1], cls[-4:], cls[-4:]+patch[-1], prelogits" if "cls" in info["dims"] else (
        "patch[-1], patch[-4:], prelogits" if info["arch"] == "vit" else "stage[-1], stage[-2:], prelogits"
    )
    lines.append(f"  token specs:     {examples}")
    return "\n".join(lines)
