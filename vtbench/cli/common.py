"""Option helpers shared by several `vt` commands."""

from __future__ import annotations

import json

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
