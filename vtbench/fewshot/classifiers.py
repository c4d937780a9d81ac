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
  ``LogisticRegression(C=C)`` (multinomial; scikit-learn fits 2-way problems as
  one binary logistic regression instead). When the support set (s) is smaller
  than the feature dim (d), each episode is first reduced, exactly, to an s-dim
  problem through its kernel (:func:`_kernel_basis`): the centred support Gram
  matrix, made positive definite without changing the optimum, is Cholesky
  factored (float64) and its factor L (s x s) is what the solver sees (with
  ``precondition="diagonal"``: the variances of L's columns fall steeply along
  the diagonal, and scaling them cuts the L-BFGS iterations by about 40%); the
  solution is mapped back through the query x support dot products. No d-dim
  work per episode besides dot products, which come either from one Gram matrix
  of all the rows a run uses (when that is cheaper, e.g. 600 Meta-Dataset
  episodes from a 3000-image pool) or per episode from features gathered a few
  episodes at a time so that they stay in cache (:class:`_Kernels`). Episodes
  whose factorisation fails (duplicate support features) and batches with
  s >= d are solved on the features directly. Rows are sorted within each
  episode first (the result does not depend on their order, the gathers do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vtbench.device import resolve_device
from vtbench.errors import VTError
from vtbench.fewshot.samplers import Episode
from vtbench.protocols import FEWSHOT_CLASSIFIERS

CLASSIFIERS = tuple(FEWSHOT_CLASSIFIERS)  # the registered ones (vtbench.protocols)
BATCH_BYTES = 256 << 20  # cap on one batch's working set (gathered features, or lr kernels)
POOL_GRAM_BYTES = 1 << 30  # cap on the Gram matrix of every row the episodes use (lr)
MIN_PIVOT = 1e-6  # smallest squared Cholesky pivot, relative to the mean squared centred norm (lr)
GATHER_BYTES = 2 << 20  # features gathered at a time for per-episode lr kernels (kept in cache)
LR_TOL = 1e-2  # fit_logreg's tol for the lr episodes: weights within about 1% of the optimum
LR_HISTORY = 5  # L-BFGS pairs per episode


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

    def sorted(self) -> "EpisodeBatch":
        """The same episodes with support and query rows in ascending order (padding, the largest row, last)."""
        s_rows, s_order = torch.sort(self.support_rows, dim=1, stable=True)
        q_rows, q_order = torch.sort(self.query_rows, dim=1, stable=True)
        return EpisodeBatch(
            s_rows, self.support_labels.gather(1, s_order), self.support_mask.gather(1, s_order),
            q_rows, self.query_labels.gather(1, q_order), self.query_mask.gather(1, q_order), self.class_mask)


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
    source = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    # A trailing zero row that padding points at: padded support rows come out zero, as the solver expects.
    pad_row = len(source)
    feats = source.new_zeros(pad_row + 1, source.shape[1])
    if l2_normalize:
        torch.nn.functional.normalize(source, dim=1, out=feats[:pad_row])
    else:
        feats[:pad_row] = source
    scores = EpisodeScores(np.empty(len(episodes), dtype=np.float64))
    kernels = None
    if classifier == "lr":
        scores.iterations = np.empty(len(episodes), dtype=np.int64)
        scores.converged = np.empty(len(episodes), dtype=bool)
        kernels = _Kernels(feats, episodes, pad_row)
    for idx in _batches(episodes, feats.shape[1], batch_bytes, kernel=classifier == "lr"):
        batch = EpisodeBatch.pad([episodes[i] for i in idx], device, pad_row)
        if classifier == "ncc":
            logits = _ncc_scores(feats[batch.support_rows], feats[batch.query_rows], batch, center)
        else:
            batch = batch.sorted()  # ascending rows: kernel gathers touch memory in order
            logits, iterations, converged = _lr_scores(kernels, batch, C)
            scores.iterations[idx] = iterations.cpu().numpy()
            scores.converged[idx] = converged.cpu().numpy()
        logits = logits.masked_fill(~batch.class_mask[:, None, :], float("-inf"))
        correct = (logits.argmax(-1) == batch.query_labels) & batch.query_mask
        scores.accuracy[idx] = (correct.sum(1) / batch.query_mask.sum(1)).double().cpu().numpy()
    return scores


def _batches(episodes: list[Episode], dim: int, batch_bytes: int, kernel: bool = False) -> list[np.ndarray]:
    """Episode indices grouped into batches of similar size whose padded working set fits ``batch_bytes``.

    The working set is the gathered support and query features (``kernel=False``), or for ``lr``
    the support-by-(support + query) kernels (float32 and float64 copies) and the s-dim features.
    """
    sizes = np.array([(len(e.support), len(e.query), e.ways) for e in episodes])
    order = np.lexsort((sizes[:, 2], sizes[:, 1], sizes[:, 0]))
    batches, current, widest = [], [], np.zeros(2, dtype=np.int64)
    for i in order:
        grown = np.maximum(widest, sizes[i, :2])
        s, q = int(grown[0]), int(grown[1])
        per_episode = (s + q) * dim * 4 if not kernel or s >= dim else (2 * s + q) * s * 16
        if current and (len(current) + 1) * per_episode > batch_bytes:
            batches.append(np.array(current))
            current, grown = [], sizes[i, :2]
        current.append(i)
        widest = grown
    batches.append(np.array(current))
    if kernel:  # lr: a batch's solve costs about episodes x S^2 x ways, padded
        batches = [part for batch in batches for part in _split_by_ways(batch, sizes)]
    return batches


def _split_by_ways(batch: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """``batch`` cut in two by ways where that saves a fifth or more of its padded lr work.

    Episodes of similar support size can differ tenfold in ways (Meta-Dataset: 5 to 50), and every
    episode of a batch is padded to its most ways. On 600 Meta-Dataset episodes (Caltech-101) one
    cut raised the useful share of the padded work from 64% to 80% and the solve went from 4.2 to
    3.7 s; a second cut (88%) gained nothing more.
    """
    order = batch[np.argsort(sizes[batch, 2], kind="stable")]
    support, ways = sizes[order, 0], sizes[order, 2]
    n = len(order)
    if n < 2:
        return [batch]
    # padded work of the first k episodes (k = 1..n) and of the episodes from k on (k = 0..n-1)
    head = np.arange(1, n + 1) * np.maximum.accumulate(support) ** 2 * ways
    tail = np.arange(n, 0, -1) * np.maximum.accumulate(support[::-1])[::-1] ** 2 * ways[-1]
    cost = head[:-1] + tail[1:]  # cut before episode k = 1..n-1
    k = int(np.argmin(cost)) + 1
    if cost[k - 1] > 0.8 * head[-1]:
        return [batch]
    return [np.sort(order[:k]), np.sort(order[k:])]


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


class _Kernels:
    """Dot products of the features episodes index, for the ``lr`` kernel basis.

    Either from one Gram matrix of every row the episodes use (when that is cheaper than the
    episodes' own support x (support + query) products and fits :data:`POOL_GRAM_BYTES`: many or
    large episodes drawn from a modest pool), or per episode, gathering the features of a few
    episodes at a time so that they stay in cache.
    """

    def __init__(self, feats: torch.Tensor, episodes: list[Episode], pad_row: int):
        self.feats = feats
        is_used = np.zeros(len(feats), dtype=bool)  # (a mask, not np.unique: no sort of every index)
        for e in episodes:
            is_used[e.support] = True
            is_used[e.query] = True
        is_used[pad_row] = True
        used = np.flatnonzero(is_used)
        per_episode = sum((len(e.support) + len(e.query)) * len(e.support) for e in episodes)
        self.gram = self.position = None
        if len(used) ** 2 < per_episode and len(used) ** 2 * 4 <= POOL_GRAM_BYTES:
            rows = torch.as_tensor(used, device=feats.device)
            pool = feats[rows]
            self.gram = pool @ pool.T
            self.position = torch.zeros(len(feats), dtype=torch.long, device=feats.device)
            self.position[rows] = torch.arange(len(rows), device=feats.device)

    def __call__(self, batch: EpisodeBatch) -> torch.Tensor:
        """``(E, S + Q, S)`` float32: every support and query feature dotted with every support feature."""
        rows = torch.cat([batch.support_rows, batch.query_rows], 1)
        S = batch.support_rows.shape[1]
        if self.gram is not None:
            rows = self.position[rows]
            return self.gram[rows[:, :, None], rows[:, None, :S]]
        E, n = rows.shape
        out = self.feats.new_empty(E, S, n)
        step = max(1, GATHER_BYTES // (n * self.feats.shape[1] * 4))
        for lo in range(0, E, step):
            chunk = rows[lo : lo + step]
            # index_select, not feats[chunk]: the same gather, about 3x faster on the CPU
            X = torch.index_select(self.feats, 0, chunk.reshape(-1)).view(*chunk.shape, -1)
            # support x all rather than all x support: the same products, about 25% faster on the CPU
            torch.matmul(X[:, :S], X.transpose(1, 2), out=out[lo : lo + step])
        return out.transpose(1, 2)


def _lr_scores(kernels: _Kernels, batch: EpisodeBatch, C: float):
    """Logits (E, Q, W) of a logistic regression fitted on each episode's support set, iterations and convergence.

    Solved in the kernel basis of :func:`_kernel_basis` (an s-dim problem with the same solution
    as the d-dim one) when the support sets are smaller than the feature dim; a batch whose padded
    support is not, and episodes whose kernel factorisation fails, are solved on the features.
    """
    from vtbench.transfer.solver import fit_logreg

    feats, mask = kernels.feats, batch.support_mask
    S, d = mask.shape[1], feats.shape[1]
    l2 = (1.0 / (C * mask.sum(1).to(feats.dtype))).unsqueeze(1)

    def solve(X, rows=slice(None)):
        return fit_logreg(X, batch.support_labels[rows], l2[rows], sample_mask=mask[rows],
                          class_mask=batch.class_mask[rows], num_classes=batch.class_mask.shape[1],
                          tol=LR_TOL, history=LR_HISTORY, precondition="diagonal")

    def direct(rows=slice(None)):
        fit = solve(feats[batch.support_rows[rows]], rows)
        return fit.predict_logits(feats[batch.query_rows[rows]])[:, 0], fit.iterations[:, 0], fit.converged[:, 0]

    if S >= d:
        return direct()
    basis = _kernel_basis(kernels(batch), mask)
    fit = solve(basis.L.to(feats.dtype))
    logits = basis.logits(fit.W[:, 0], fit.b[:, 0]).to(feats.dtype)
    iterations, converged = fit.iterations[:, 0].clone(), fit.converged[:, 0].clone()
    failed = torch.nonzero(~basis.ok).squeeze(1)
    if len(failed):  # e.g. duplicate support features: solve those episodes on the features
        logits[failed], iterations[failed], converged[failed] = direct(failed)
    return logits, iterations, converged


@dataclass
class _KernelBasis:
    """A batch of episodes factorised as :func:`_kernel_basis` describes (float64)."""

    L: torch.Tensor  # (E, S, S) Cholesky factor of K': the s-dim support features handed to the solver
    query: torch.Tensor  # (E, Q, S) float32 centred query x centred support dot products
    shift: torch.Tensor  # (E, S) (c / n) L^-1 m
    mask: torch.Tensor  # (E, S) support mask
    ok: torch.Tensor  # (E,) bool: the factorisation succeeded

    def logits(self, V: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Query logits (E, Q, W) under the solver's solution ``V (E, S, W)``, ``b (E, W)`` in the basis."""
        V = V.double()
        A = torch.linalg.solve_triangular(self.L.transpose(1, 2), V, upper=True)  # L^-T V: W = Xc^T A
        A = (A * self.mask[..., None]).to(self.query.dtype)  # (padding rows of A are 0 anyway)
        b = b.double() + (self.shift[:, None, :] @ V).squeeze(1)
        return self.query @ A + b.to(A.dtype)[:, None, :]


def _kernel_basis(kernel: torch.Tensor, mask: torch.Tensor) -> _KernelBasis:
    """Reduce each episode's L2-regularised logistic regression from d to s (support size) dims, exactly.

    ``kernel`` (E, S + Q, S): support and query features dotted with the support features. With
    ``Xc`` the support features centred on their mean ``mu`` (padding rows zero), ``m`` the support
    mask, ``n`` the support size and ``c`` the mean squared norm of ``Xc``'s rows, factor::

        K' = Xc Xc^T + (c / n) m m^T + c diag(1 - m) = L L^T        (Cholesky, float64)

    and hand the solver the s-dim features ``L``. ``W = Xc^T L^-T V`` maps its weights ``V`` onto
    the span of the support features with ``Xc W = L V - (c / n) m u^T V`` (``u = L^-1 m``) on the
    support rows: the same logits up to one shift of every row, which the unpenalised bias absorbs.
    The penalty is preserved where the optimum lies: moving ``V`` along ``u`` shifts every logit
    row by the same amount (``L u = m``), so the optimal ``V`` is orthogonal to ``u``, and there
    ``||W||^2 = ||V||^2 - (c / n) (u^T V)^2 = ||V||^2`` (a component along ``u`` maps to ``W = 0``:
    ``K' m = c m`` and ``Xc^T m = 0``). The ``(c / n) m m^T`` term fills the null direction that
    centring creates, ``c diag(1 - m)`` the padding rows, so ``K'`` is positive definite whenever the
    support features are affinely independent. A query ``x`` gets logits
    ``(x - mu) Xc^T L^-T V + (c / n) u^T V + b``. ``ok`` is False where the Cholesky fails or a
    pivot is below ``MIN_PIVOT * c`` (duplicate or nearly duplicate support features).
    ``kernel`` is overwritten (its query part becomes the centred query dot products).
    """
    S = mask.shape[1]
    K = kernel[:, :S].double()
    m = mask.double()
    n = m.sum(1, keepdim=True)  # (E, 1)
    pair = m[:, :, None] * m[:, None, :]
    r = (K @ m[..., None]) / n[:, :, None]  # (E, S, 1): x_i . mu (padding rows of K are zero)
    mm = (r[..., 0] * m).sum(1, keepdim=True)[:, :, None] / n[:, :, None]  # mu . mu
    K.sub_(r).sub_(r.transpose(1, 2)).add_(mm).mul_(pair)  # Xc Xc^T
    # Queries in float32 (they only enter the logits), in place on the kernel.
    query = kernel[:, S:]
    query.sub_((query @ mask.to(query.dtype)[..., None]) / n.to(query.dtype)[:, :, None])
    query.sub_(r.transpose(1, 2).to(query.dtype)).add_(mm.to(query.dtype))
    c = (torch.diagonal(K, dim1=1, dim2=2).sum(1, keepdim=True) / n).clamp_min(1e-12)
    K.add_(pair.mul_((c / n)[:, :, None]))
    torch.diagonal(K, dim1=1, dim2=2).add_((1 - m) * c)
    L, info = torch.linalg.cholesky_ex(K)
    # A tiny pivot (near-duplicate support features) would amplify float32 rounding in L^-T V.
    ok = (info == 0) & (torch.diagonal(L, dim1=1, dim2=2).square().amin(1) > MIN_PIVOT * c[:, 0])
    if not bool(ok.all()):  # (in place: a torch.where over every episode's factor would cost a full pass)
        L[~ok] = torch.eye(S, dtype=L.dtype, device=L.device)
    shift = (c / n) * torch.linalg.solve_triangular(L, m[..., None], upper=False)[..., 0]
    return _KernelBasis(L=L, query=query, shift=shift, mask=mask, ok=ok)
