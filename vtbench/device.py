"""Which torch device a run uses: one resolution for extract, probe, fewshot and suites."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtbench.errors import VTError

if TYPE_CHECKING:
    import torch


def resolve_device(device: "str | torch.device | None") -> "torch.device":
    """``auto`` (or None) picks CUDA when available, else the CPU.

    An unknown device name, or CUDA where there is none, is a user error (one line, exit code 2).
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):  # the two vtbench runs on and is tested on
        raise VTError(f"unknown device '{device}'; use auto, cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VTError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return resolved
