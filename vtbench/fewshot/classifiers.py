"""Per-episode classifiers, solved for many episodes at once on padded batched tensors.

Episodes differ in ways, shots and queries, so a batch pads them to its largest
and carries masks. Episodes are sorted by size before batching so that padding
stays small, and batches are capped in memory. Every classifier returns the
accuracy of every episode (fraction of its queries classified correctly).

- ``ncc``: nearest centroid by cosine similarity (ProtoNet / SimpleShot).
  ``center=True`` subtracts the mean of the episode's support features from
  support and query features first (SimpleShot's centring with the support set
  as the base set, so no extra data is needed).
- ``lr``: multinomial logistic regression fitted on the support set with
  :func:`vtbench.transfer.solver.fit_logreg` (mean cross-entropy + l2/2 ||W||^2,
  bias not penalised), l2 = 1 / (C * n_support), i.e. scikit-learn's
  ``LogisticRegression(C=C)``. The solver reduces each episode, exactly, to
  the span of its support features when the support set (s) is smaller than
  the feature dim (d): one O(s^2 d) factorisation, then iterations in s dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vtbench.errors import VTError
from vtbench.fewshot.samplers import Episode

CLASSIFIERS = ("lr", "ncc")
BATCH_BYTES = 256 << 20  # cap on one batch's gathered float32 features


@dataclass
class EpisodeBatch:
    """Padded row indices and labels of several episodes; masks mark real entries."""

    support_rows: torch.Tensor  # (E, S) long
    support_labels: torch.Tensor  # (E, S) long, 0 where padded
    support_mask: torch.Tensor  # (E, S) bool
    query_rows: torch.Tensor  # (E, Q) long
    query_labels: torch.Tensor  # (E, Q) long
    query_mask: torch.Tensor  # (E, Q) bool
    class_mask: torch.Tensor  # (E, W) bool, True for the episode's ways

    @classmethod
    def pad(cls, episodes: list[Episode], device, pad_row: int = 0) -> "EpisodeBatch":
        """Pad to the largest episode; padded row indices point at ``pad_row``, padded labels are 0."""

        def padded(arrays, fill=0):
            width = max(len(a) for a in arrays)
            out = np.full((len(arrays), width), fill, dtype=np.int64)
            mask = np.zeros((len(arrays), width), dtype=bool)
            for i, a in enumerate(arrays):
                out[i, : len(a)] = a
                mask[i, : len(a)] = True
            return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)

        support_rows, support_mask = padded([e.support for e in episodes], pad_row)
        support_labels, _ = padded([e.support_labels for e in episodes])
        query_rows, query_mask = padded([e.query for e in episodes], pad_row)
        query_labels, _ = padded([e.query_labels for e in episodes])
        ways = torch.tensor([e.ways for e in episodes], device=device)
        class_mask = torch.arange(int(ways.max()), device=device)[None, :] < ways[:, None]
        return cls(support_rows, support_labels, support_mask, query_rows, query_labels, query_mask, class_mask)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise VTError(f"unknown device '{device}'; use auto, cpu or cuda") from None


@dataclass
class EpisodeScores:
    """Per-episode results of one classifier on a list of episodes."""

    accuracy: np.ndarray  # (E,) fraction of queries classified correctly
    iterations: np.ndarray | None = None  # lr: L-BFGS iterations per episode
    converged: np.ndarray | None = None  # lr: whether the solver reached its tolerance


def episode_accuracies(
    features: np.ndarray,
    episodes: list[Episode],
    classifier: str = "lr",
    *,
    l2_normalize: bool = True,
    center: bool = False,
    C: float = 1.0,
    device: str | torch.device | None = "auto",
    batch_bytes: int = BATCH_BYTES,
) -> EpisodeScores:
    """Solve every episode with ``classifier``; rows of ``features`` are the rows the episodes index."""
    if classifier not in CLASSIFIERS:
        raise VTError(f"unknown classifier '{classifier}'; use one of {', '.join(CLASSIFIERS)}")
    if center and classifier != "ncc":
        raise VTError("--center applies to the ncc classifier only")
    if C <= 0:
        raise VTError(f"C must be positive, got {C}")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    if l2_normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    # A trailing zero row that padding points at: padded support rows come out zero, as the solver expects.
    pad_row = len(feats)
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    scores = EpisodeScores(np.empty(len(episodes), dtype=np.float64))
    if classifier == "lr":
        scores.iterations = np.empty(len(episodes), dtype=np.int64)
        scores.converged = np.empty(len(episodes), dtype=bool)
    for idx in _batches(episodes, feats.shape[1], batch_bytes):
        batch = EpisodeBatch.pad([episodes[i] for i in idx], device, pad_row)
        support, query = feats[batch.support_rows], feats[batch.query_rows]
        if classifier == "ncc":
            logits = _ncc_scores(support, query, batch, center)
        else:
            logits, fit = _lr_scores(support, query, batch, C)
            scores.iterations[idx] = fit.iterations[:, 0].cpu().numpy()
            scores.converged[idx] = fit.converged[:, 0].cpu().numpy()
        logits = logits.masked_fill(~batch.class_mask[:, None, :], float("-inf"))
        correct = (logits.argmax(-1) == batch.query_labels) & batch.query_mask
        scores.accuracy[idx] = (correct.sum(1) / batch.query_mask.sum(1)).double().cpu().numpy()
    return scores


def _batches(episodes: list[Episode], dim: int, batch_bytes: int) -> list[np.ndarray]:
    """Episode indices grouped into batches of similar size whose padded features fit ``batch_bytes``."""
    sizes = np.array([(len(e.support), len(e.query), e.ways) for e in episodes])
    order = np.lexsort((sizes[:, 2], sizes[:, 1], sizes[:, 0]))
    batches, current, widest = [], [], np.zeros(2, dtype=np.int64)
    for i in order:
        grown = np.maximum(widest, sizes[i, :2])
        # support and query features, plus the solver's support-span basis (d x s)
        cost = (len(current) + 1) * (2 * grown[0] + grown[1]) * dim * 4
        if current and cost > batch_bytes:
            batches.append(np.array(current))
            current, grown = [], sizes[i, :2]
        current.append(i)
        widest = grown
    batches.append(np.array(current))
    return batches


def _ncc_scores(support, query, batch: EpisodeBatch, center: bool) -> torch.Tensor:
    """Cosine similarity of every query to every class centroid, (E, Q, W)."""
    weight = batch.support_mask.unsqueeze(-1).to(support.dtype)
    if center:
        mean = support.sum(1, keepdim=True) / weight.sum(1, keepdim=True)  # padding rows are zero
        # (centring moves padding rows off zero; the masked one-hot below keeps them out of the centroids)
        support, query = support - mean, query - mean
    onehot = torch.nn.functional.one_hot(batch.support_labels, batch.class_mask.shape[1]).to(support.dtype) * weight
    centroids = onehot.transpose(1, 2) @ support / onehot.sum(1).clamp_min(1).unsqueeze(-1)
    normalize = torch.nn.functional.normalize
    return normalize(query, dim=-1) @ normalize(centroids, dim=-1).transpose(1, 2)


def _lr_scores(support, query, batch: EpisodeBatch, C: float):
    """Logits (E, Q, W) of a logistic regression fitted on each episode's support set, and the fit."""
    from vtbench.transfer.solver import fit_logreg

    n_support = batch.support_mask.sum(1).to(support.dtype)
    fit = fit_logreg(
        support, batch.support_labels, (1.0 / (C * n_support)).unsqueeze(1),
        sample_mask=batch.support_mask, class_mask=batch.class_mask, num_classes=batch.class_mask.shape[1],
    )
    return fit.predict_logits(query)[:, 0], fit
