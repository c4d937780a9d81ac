"""Option helpers shared by several `vt` commands."""

from __future__ import annotations

import json

from typer.core import TyperCommand

from vtbench.errors import VTError


def weights_choice(pretrained: bool, checkpoint: str | None, random_init: bool) -> str:
    """Map --pretrained / --checkpoint FILE / --random-init to the `weights` argument of the API."""
    if checkpoint and random_init:
        raise VTError("pass either --checkpoint or --random-init, not both")
    if checkpoint:
        return checkpoint
    if random_init:
        return "random"
    if not pretrained:
        raise VTError("--no-pretrained needs --checkpoint FILE or --random-init")
    return "pretrained"


def parse_model_kwargs(text: str | None) -> dict:
    """--model-kwargs takes a JSON object passed to timm.create_model, e.g. '{"img_size": 64}'."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VTError(f"--model-kwargs must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise VTError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 64}'")
    return value


def split_list(values: list[str] | None) -> list[str] | None:
    """Accept repeated options and comma-separated values alike: --split train,test --split val."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


class MultiValueCommand(TyperCommand):
    """Lets ``--shots 1 5`` and ``--tokens 'cls[-1]' 'cls[-4:]'`` take several values after one flag (the options
    in ``multi_value``).

    Click options take one value each; this rewrites ``--shots 1 5`` into
    ``--shots 1 --shots 5`` before parsing (the command has no positional
    arguments, so a bare word can only belong to the option before it).
    """

    multi_value: tuple[str, ...] = ()  # the options that take several values

    def parse_args(self, ctx, args):
        rewritten, current, has_value = [], None, False
        for arg in args:
            if arg in self.multi_value:
                current, has_value = arg, False
            elif arg.startswith("-"):
                current = None
            elif current is not None and has_value:
                rewritten.append(current)
            else:
                has_value = True
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)
