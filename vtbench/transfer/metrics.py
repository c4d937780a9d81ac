"""Classification metrics from class scores (percentages)."""

from __future__ import annotations

import torch


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (%) over the last two dims: scores ``(..., m, C)``, labels ``(m,)`` -> ``(...)``."""
    return (scores.argmax(-1) == labels.to(scores.device)).double().mean(-1) * 100


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """``top1``, ``top5`` (top-min(5, C)) and ``mean_per_class`` accuracy (%) of scores ``(m, C)``."""
    num_classes = scores.shape[-1]
    top = scores.topk(min(5, num_classes), dim=-1).indices.cpu()
    labels = labels.cpu()
    hit1 = (top[:, 0] == labels).double()
    hit5 = (top == labels[:, None]).any(-1).double()
    count = torch.bincount(labels, minlength=num_classes).double()
    recall = torch.bincount(labels, weights=hit1, minlength=num_classes)[count > 0] / count[count > 0]
    return {
        "top1": float(hit1.mean() * 100),
        "top5": float(hit5.mean() * 100),
        "mean_per_class": float(recall.mean() * 100),
    }
