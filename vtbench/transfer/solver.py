"""Batched multinomial logistic regression: many independent L2-regularised problems in one run.

:func:`fit_logreg` solves ``P x G`` problems at once: ``P`` feature matrices
(e.g. one per token spec, or one per few-shot episode) times ``G`` L2 strengths.
The objective of problem ``(p, g)`` is::

    mean over valid samples i of  cross_entropy(x_i W + b, y_i)  +  l2[p, g] / 2 * ||W||^2

with the bias unpenalised. This is scikit-learn's ``LogisticRegression``
(lbfgs, multinomial) objective divided by ``n``: its ``C`` corresponds to
``l2 = 1 / (C * n)``.

How it works:

1. Exact reparametrisations first. Features are centred (the bias absorbs the
   mean), which decouples the bias from the weights and conditions the problem
   much better. When ``n < d`` the features are also rotated onto the span of
   the samples (``X_c^T = Q R``, so ``X_c = R^T Q^T``): an L2-regularised
   optimum lies in that span and the rotation preserves ``||W||``, so each
   problem shrinks from ``d`` to ``n`` dimensions with the same solution.
   With ``precondition``, L-BFGS works on weights scaled per axis
   (:func:`_axis_scale`), so that low-variance axes are not crawled along.
   ``"principal"`` first rotates the features onto their principal axes (also
   norm-preserving): on anisotropic features this halves the iterations or
   better, at one eigendecomposition per feature matrix (``reuse_bases`` shares
   it between calls on the same features). ``"diagonal"`` scales the axes the
   features already have, for the price of their column variances. It suits
   many small problems, such as few-shot episodes, where an eigendecomposition
   each costs more than the iterations it saves.
2. A batched L-BFGS (history 10, two-loop recursion, initial inverse
   Hessian ``gamma * I`` with ``gamma = s'y / y'y`` from the newest pair). Every
   problem keeps its own history, its own step size and its own Armijo
   backtracking line search (quadratic interpolation), and stops on its own.
3. One function evaluation serves every unfinished problem: for each feature
   matrix ``p`` the weights of its unfinished grid values are stacked along the
   class axis, so the logits and the gradient are one ``(n x d) @ (d x G*C)``
   matmul each. Finished problems drop out of the batch.

Convergence: ``||grad||_2 <= tol * l2 * ||W||_2`` (default ``tol = 1e-2``), the
gradient taken in the centred parametrisation above (an uncentred one mixes the
bias gradient, times the feature mean, into the weights' gradient). The
objective is ``l2``-strongly convex in ``W``, so ``||W - W*|| <= ||grad|| / l2``
(up to the unpenalised bias): the criterion bounds the weights' relative error
by about ``tol``, whatever the
feature scale, the number of classes or the regularisation. The bias gradient is
weighted by ``max(1, classes * l2 / s)`` (:func:`bias_weight`), so that the bias,
whose curvature is only the softmax's, is held to the same bound on the logits. (A gradient norm
relative to its value at zero, as in LIBLINEAR, is not enough: weakly
regularised problems have flat objectives and stop far from their optimum, with
validation accuracies 20 points off.) The denominator has a floor of
``1e-4 * ||grad at W=0, b=0||`` for problems whose optimal weights are ~0.
``converged`` says whether a problem got there within ``max_iter`` iterations;
``grad_norm`` is the measure ``||(grad_W, k grad_b)|| / max(l2 ||W||, floor)``. Everything is
deterministic for a given input, device and thread count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Problems whose logits tensor would exceed this many elements are evaluated in chunks.
_MAX_LOGITS = 1 << 25
_ARMIJO_C1 = 1e-4
_MIN_STEP = 1e-10
# Approximate Wolfe acceptance (Hager & Zhang 2005): delta, sigma, and the allowed loss increase (relative).
_WOLFE_DELTA, _WOLFE_SIGMA, _WOLFE_EPS = 0.1, 0.9, 1e-6
# Convergence measure ||grad|| / max(l2 ||W||, _FLOOR * ||grad at 0||): the floor only matters when the
# optimal weights are ~0 (no signal in the features), where l2 ||W|| cannot serve as the scale.
_FLOOR = 1e-4
# Preconditioning (fit_logreg's precondition) scales axis i by (variance_i + C * l2) ** -power.
# 1/2 would equalise the curvature a * variance + l2 that the softmax has at the start, but fitted
# softmaxes saturate along the high-variance axes, where the curvature then grows more slowly.
# principal: measured with the probe's grid and refit (benchmarks/probe_speed.py): on the synthetic
# problem, power 1/2 took 16.4 s and 1/4 took 14.2 s (no preconditioning: 30.3 s); on Lite0
# Caltech-101, 5.1 s and 3.8 s (none: 3.6 s).
# diagonal: measured on 600 Meta-Dataset episodes of Lite0 Caltech-101 (benchmarks/fewshot_speed.py's
# episodes): mean L-BFGS iterations 10.1 without, 6.8 at power 1/4, 5.8 at 3/8, 6.2 at 1/2, 7.6 at 5/8;
# fixed 5-way 5-shot 4.9 without, 4.0, 3.3, 3.9.
_PRECONDITION_POWER = {"principal": 0.25, "diagonal": 0.375}
# The stopping rule in words, for result records.
CRITERION = ("||(grad_W, k grad_b)|| <= tol * max(l2 ||W||, 1e-4 ||grad at 0||), k = max(1, classes * l2 / s), "
             "s = the features' RMS column deviation")
# Below this many multiply-adds per function evaluation (problems x samples x parameters), a CPU
# solve runs single-threaded: its many small ops would otherwise wait on thread wake-ups.
_PARALLEL_WORK = 1 << 24


@dataclass
class LogRegFit:
    """Solutions of :func:`fit_logreg`: one ``(W, b)`` per problem ``(p, g)``, plus how the solver fared."""

    W: torch.Tensor  # (P, G, d, C)
    b: torch.Tensor  # (P, G, C)
    iterations: torch.Tensor  # (P, G) int64: L-BFGS iterations (accepted steps)
    converged: torch.Tensor  # (P, G) bool: the convergence measure reached tol
    loss: torch.Tensor  # (P, G) float64: final objective
    grad_norm: torch.Tensor  # (P, G): final convergence measure ||grad|| / max(l2 ||W||, floor)
    class_mask: torch.Tensor | None = None  # (P, C) bool: the classes each problem can predict

    def predict_logits(self, X: torch.Tensor) -> torch.Tensor:
        """Logits ``(P, G, m, C)`` of features ``X`` ``(P, m, d)`` under every solution (absent classes: -inf)."""
        P, G, d, C = self.W.shape
        W = self.W.to(X.device)
        logits = X.to(W.dtype) @ W.permute(0, 2, 1, 3).reshape(P, d, G * C)
        logits = logits.reshape(P, -1, G, C).permute(0, 2, 1, 3) + self.b.to(X.device)[:, :, None, :]
        if self.class_mask is not None:
            logits = logits.masked_fill(~self.class_mask.to(X.device)[:, None, None, :], float("-inf"))
        return logits


@dataclass
class _Basis:
    """Centred (and for ``n < d`` rotated) features with a trailing bias column: ``Z = [(X - mu) U, 1]``."""

    Z: torch.Tensor | None  # (P, n, r + 1); padding rows are zero; None for a RowSource (never materialised)
    mu: torch.Tensor  # (P, d)
    U: torch.Tensor | None  # (P, d, r) orthonormal columns, or None for the identity (r = d)
    variance: torch.Tensor | None = None  # (P, r): the features' variance along each axis (when preconditioned)
    scale: torch.Tensor | None = None  # (P,): RMS deviation of the features' non-constant columns (see bias_weight)

    @property
    def width(self) -> int:
        """``r + 1``: the solver's variables per class."""
        return (self.mu.shape[1] if self.U is None else self.U.shape[2]) + 1


# Set inside reuse_bases(): the bases computed so far, keyed by their inputs' memory (see _basis_key).
_reused_bases: dict | None = None


@contextmanager
def reuse_bases():
    """Within this block, fits on the same feature tensor (unchanged) share one basis computation.

    A probe's grid runs several ``fit_logreg`` calls on the same features (coarse to fine with warm
    starts); with ``precondition="principal"`` each basis costs a covariance and its eigendecomposition.
    """
    global _reused_bases
    outer, _reused_bases = _reused_bases, {} if _reused_bases is None else _reused_bases
    try:
        yield
    finally:
        _reused_bases = outer


def _basis_key(X: torch.Tensor) -> tuple:
    # The memory X views and its version counter (bumped by in-place writes): the cache holds X itself,
    # so that memory cannot be freed and reused for other data while the key is alive.
    return (X.data_ptr(), X.shape, X.stride(), X.dtype, X.device, X._version)


def _basis(X: torch.Tensor, sample_mask: torch.Tensor, n_valid: torch.Tensor, precondition: str | None = None) -> _Basis:
    if _reused_bases is None:
        return _compute_basis(X, sample_mask, n_valid, precondition)
    key = (_basis_key(X), precondition)
    hit = _reused_bases.get(key)
    if hit is None or not torch.equal(hit[2], sample_mask):
        hit = _reused_bases[key] = (_compute_basis(X, sample_mask, n_valid, precondition), X, sample_mask.clone())
    return hit[0]


def _compute_basis(X: torch.Tensor, sample_mask: torch.Tensor, n_valid: torch.Tensor, precondition: str | None) -> _Basis:
    P, n, d = X.shape
    weight = sample_mask.to(X.dtype)[..., None]
    mu = (X * weight).sum(1) / n_valid[:, None]
    Xc = (X - mu[:, None, :]) * weight
    scale = feature_scale(Xc, n_valid)
    U = None
    if n < d:
        Q, R = torch.linalg.qr(Xc.transpose(1, 2))  # Xc^T = Q R: Q (d, n) orthonormal, Xc = R^T Q^T
        U, Xc = Q, R.transpose(1, 2)
    variance = None
    if precondition == "principal":  # rotate onto the principal axes (eigenvectors of the covariance): W's norm is unchanged
        variance, V = _principal_axes(Xc.transpose(1, 2) @ Xc / n_valid[:, None, None])
        Xc = Xc @ V
        U = V if U is None else U @ V
        variance = variance.clamp_min(0)
    elif precondition == "diagonal":  # padding rows of Xc are zero
        variance = Xc.square().sum(1) / n_valid[:, None]
    Z = torch.cat([Xc, weight], dim=2).contiguous()
    return _Basis(Z=Z, mu=mu, U=U, variance=variance, scale=scale)


def _principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of covariances ``(P, r, r)``. Near-constant features (a random-init ViT's class token,
    stored in float16) can make float32 ``eigh`` fail to converge, or return NaN: those are decomposed in float64."""
    try:
        variance, V = torch.linalg.eigh(cov)
        if bool(torch.isfinite(variance).all()) and bool(torch.isfinite(V).all()):
            return variance, V
    except torch.linalg.LinAlgError:
        pass
    # Single-threaded, the same matrices come back as NaN instead of raising.
    variance, V = torch.linalg.eigh(cov.double())
    return variance.to(cov.dtype), V.to(cov.dtype)


def feature_scale(Xc: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """RMS deviation ``(P,)`` of the non-constant columns of centred features ``Xc (P, n, d)`` (zero-padded
    columns do not count, so padding changes nothing)."""
    variance = Xc.square().sum(1) / n_valid[:, None]
    columns = (variance > 0).sum(1)
    scale = (variance.sum(1) / columns.clamp_min(1)).sqrt()
    # Constant features (a random-init DINOv2 ViT's class token in float16): no scale to compare the bias
    # with; 1 keeps bias_weight finite (a floor of tiny made it inf, and the measure inf * 0 = nan).
    return torch.where(columns > 0, scale, torch.ones_like(scale))


def bias_weight(num_classes: torch.Tensor, l2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How much more the bias gradient counts than the weights' in the convergence measure.

    The weights' error is at most ||grad_W|| / l2 (strong convexity), but the unpenalised bias has only
    the softmax's curvature, about 1 / classes: its error is about classes * ||grad_b||, and it moves
    every logit as much as a weight error of that size times the features' scale ``s`` does. Weighting
    grad_b by ``classes * l2 / s`` bounds both errors alike (strongly regularised probes: on shared DTD
    at l2 = 31.6 an unweighted criterion left the bias 7x off and validation accuracy 3 points off).
    """
    return torch.clamp_min(num_classes.to(l2.dtype) * l2 / scale.to(l2.dtype), 1.0)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last axis. Below 16 classes (few-shot ways) spelled out in elementwise ops and
    reductions: torch's CPU log_softmax is not vectorised there and runs 3x slower (from 16 on it is 2-4x
    faster). Shifted by the maximum first, as log_softmax does (``x - logsumexp(x)`` loses float32 digits)."""
    if logits.shape[-1] >= 16:
        return torch.log_softmax(logits, dim=-1)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log_()


class _Objective:
    """Value and gradient of the batched objective for any subset of the ``P * G`` problems."""

    def __init__(self, Z, y, sample_mask, class_mask, n_valid, l2, G):
        self.Z, self.y, self.G = Z, y, G
        self.sample_mask, self.class_mask = sample_mask, class_mask
        self.row_weight = sample_mask.to(Z.dtype) / n_valid[:, None]  # (P, n)
        self.l2 = l2.reshape(-1)  # (P*G,)
        self.penalised = torch.ones(Z.shape[2], 1, dtype=Z.dtype, device=Z.device)
        self.penalised[-1] = 0  # the bias row

    def __call__(self, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (K,) float64, grad (K, r+1, C))`` of problems ``idx`` (ascending) at weights ``w``."""
        K, r1, C = w.shape
        n = self.Z.shape[1]
        p_of = torch.div(idx, self.G, rounding_mode="floor")
        ps, counts = torch.unique_consecutive(p_of, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(ps), device=idx.device), counts)
        slot = torch.arange(K, device=idx.device) - (torch.cumsum(counts, 0) - counts)[group]
        A = int(counts.max())
        chunk = max(1, _MAX_LOGITS // max(1, n * A * C))
        nll = torch.empty(K, dtype=torch.float64, device=w.device)
        grad = torch.empty_like(w)
        P = self.Z.shape[0]
        for lo in range(0, len(ps), chunk):
            pc = ps[lo : lo + chunk]
            # Every problem of every feature matrix present (the common case early on): no gathers needed.
            dense = len(pc) == P and K == P * self.G
            every_matrix = len(pc) == P  # (a probe solves one feature matrix: never copy it)

            def rows(t):
                return t if every_matrix else t[pc]

            members = torch.nonzero((group >= lo) & (group < lo + len(pc))).squeeze(1)
            g_loc, s_loc = group[members] - lo, slot[members]
            # Stack the unfinished grid values of each feature matrix along the class axis.
            if dense:
                W = w.view(P, A, r1, C)
            else:
                W = w.new_zeros(len(pc), A, r1, C)
                W[g_loc, s_loc] = w[members]
            Z = rows(self.Z)
            logits = (Z @ W.permute(0, 2, 1, 3).reshape(len(pc), r1, A * C)).reshape(len(pc), n, A, C)
            logits.masked_fill_(~rows(self.class_mask)[:, None, None, :], float("-inf"))
            logp = _log_softmax(logits)
            del logits
            target = rows(self.y)[:, :, None, None].expand(-1, -1, A, 1)
            picked = logp.gather(-1, target).squeeze(-1)  # (p, n, A)
            weight = rows(self.row_weight)[:, :, None]
            valid = rows(self.sample_mask)[:, :, None]
            nll_chunk = -(torch.where(valid, picked, 0.0).double() * weight.double()).sum(1)  # (p, A)
            dlogits = logp.exp_()
            # The target's p - 1 as minus the other classes' mass: p - 1 itself cancels in float32 once p is
            # near 1 (fitted, weakly regularised probes), which put a floor of ~1e-3 under the convergence measure.
            dlogits.scatter_(-1, target, 0.0)
            dlogits.scatter_(-1, target, -dlogits.sum(-1, keepdim=True))
            dlogits.mul_(weight[..., None])
            gW = (Z.transpose(1, 2) @ dlogits.reshape(len(pc), n, A * C)).reshape(len(pc), r1, A, C)
            if dense:
                grad = gW.permute(0, 2, 1, 3).contiguous().view(K, r1, C)
                nll = nll_chunk.reshape(K)
            else:
                grad[members] = gW.permute(0, 2, 1, 3)[g_loc, s_loc]
                nll[members] = nll_chunk[g_loc, s_loc]
        l2 = self.l2[idx][:, None, None]
        penalised_w = self.penalised * w
        grad += l2 * penalised_w
        loss = nll + 0.5 * (l2 * penalised_w.square()).double().sum((1, 2))
        return loss, grad


class RowSource:
    """One feature matrix ``(n, d)`` too large to hold, read a chunk of rows at a time.

    ``read()`` yields float32 arrays or tensors ``(m, d)`` that together are the rows in order; it is
    called once per function evaluation, so the solver's memory is a chunk, not the matrix. ``to(dtype)``
    is the same rows in another solver precision. :func:`fit_logreg` takes one in place of ``X``
    (``P = 1``) and reaches the same optimum as on the matrix in memory.
    """

    def __init__(self, n: int, d: int, read, dtype: torch.dtype = torch.float32, device="cpu", passes=None):
        self.n, self.d, self.read = n, d, read
        self.dtype, self.device = dtype, torch.device(device)
        self.passes = [0] if passes is None else passes  # full reads so far, shared by every precision

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.n, self.d)

    def dim(self) -> int:
        return 3

    def to(self, dtype: torch.dtype) -> "RowSource":
        return self if dtype == self.dtype else RowSource(self.n, self.d, self.read, dtype, self.device, self.passes)

    def chunks(self):
        """``(start, rows (m, d))`` in the solver's dtype and device."""
        self.passes[0] += 1
        start = 0
        for chunk in self.read():
            chunk = torch.as_tensor(chunk).to(self.device, self.dtype)
            yield start, chunk
            start += len(chunk)
        if start != self.n:
            raise ValueError(f"a RowSource of {self.n} rows read {start}")


def _streamed_basis(source: RowSource, precondition: str | None) -> _Basis:
    """The basis of a RowSource: its mean and covariance from one float64 pass; with ``"principal"`` its
    principal axes (no ``n < d`` rotation: a streamed matrix is tall). Computed once per source and
    shared by its precisions within :func:`reuse_bases`."""
    key = ("stream", id(source.read), precondition)
    hit = _reused_bases.get(key) if _reused_bases is not None else None
    if hit is None:
        hit = (_moments_basis(source, precondition), source.read)  # the reader kept alive: its id stays unique
        if _reused_bases is not None:
            _reused_bases[key] = hit
    basis = hit[0]
    cast = {f: None if v is None else v.to(source.dtype) for f, v in vars(basis).items()}
    return _Basis(**cast)


def _moments_basis(source: RowSource, precondition: str | None) -> _Basis:
    d = source.d
    total = torch.zeros(d, dtype=torch.float64, device=source.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=source.device)
    for _, chunk in source.to(torch.float64).chunks():
        total += chunk.sum(0)
        outer += chunk.T @ chunk
    mu = total / source.n
    # float64 sums of raw products: the cancellation in outer / n - mu mu' costs digits only where the
    # mean is many deviations from zero, and the probe streams standardised features.
    cov = outer / source.n - torch.outer(mu, mu)
    column_variance = cov.diagonal().clamp_min(0)
    columns = (column_variance > 0).sum()
    scale = (column_variance.sum() / columns.clamp_min(1)).sqrt() if int(columns) else torch.ones((), dtype=cov.dtype)
    U = variance = None
    if precondition == "principal":
        variance, U = _principal_axes(cov[None])
        variance = variance.clamp_min(0)
    elif precondition == "diagonal":
        variance = column_variance[None]
    return _Basis(Z=None, mu=mu[None], U=U, variance=variance, scale=scale.reshape(1))


class _StreamedObjective:
    """:class:`_Objective` for a RowSource: the same loss and gradient, summed over row chunks.

    Logits are taken in the original coordinates: with ``Z = [(X - mu) U, 1]``, ``Z w = X (U w_W) +
    (w_b - mu U w_W)``, so each chunk costs one ``(m x d) @ (d x K*C)`` product and the rotation is
    applied to the weights and the gradient once per evaluation.
    """

    def __init__(self, source: RowSource, y, basis: _Basis, class_mask, l2, G):
        self.source, self.y, self.basis = source, y, basis
        self.class_mask = class_mask  # (C,)
        self.l2 = l2.reshape(-1)

    def __call__(self, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, r1, C = w.shape
        n, d = self.source.n, self.source.d
        U, mu = self.basis.U, self.basis.mu[0]
        W = w[:, :-1] if U is None else U[0] @ w[:, :-1]  # (K, d, C)
        b = w[:, -1] - torch.einsum("d,kdc->kc", mu, W)
        W_cat = W.permute(1, 0, 2).reshape(d, K * C)
        nll = torch.zeros(K, dtype=torch.float64, device=w.device)
        grad_X = torch.zeros(d, K * C, dtype=w.dtype, device=w.device)
        grad_b = torch.zeros(K, C, dtype=w.dtype, device=w.device)
        rows = max(1, _MAX_LOGITS // max(1, K * C))
        for start, chunk in self.source.chunks():
            for lo in range(0, len(chunk), rows):
                X = chunk[lo : lo + rows]
                logits = (X @ W_cat).view(len(X), K, C) + b
                logits.masked_fill_(~self.class_mask, float("-inf"))
                logp = _log_softmax(logits)
                target = self.y[start + lo : start + lo + len(X)][:, None, None].expand(-1, K, 1)
                nll -= logp.gather(-1, target).squeeze(-1).double().sum(0) / n
                dlogits = logp.exp_()
                dlogits.scatter_(-1, target, 0.0)  # p - 1 as minus the other classes' mass (see _Objective)
                dlogits.scatter_(-1, target, -dlogits.sum(-1, keepdim=True))
                dlogits.div_(n)
                grad_X += X.T @ dlogits.view(len(X), K * C)
                grad_b += dlogits.sum(0)
        grad_W = grad_X.view(d, K, C).permute(1, 0, 2) - mu[None, :, None] * grad_b[:, None, :]
        if U is not None:
            grad_W = U[0].T @ grad_W
        l2 = self.l2[idx][:, None, None]
        grad = torch.cat([grad_W + l2 * w[:, :-1], grad_b[:, None]], dim=1)
        loss = nll + 0.5 * (l2 * w[:, :-1].square()).double().sum((1, 2))
        return loss, grad


class _History:
    """Per-problem L-BFGS memory (ring buffers of ``s`` and ``y``, with ``s'y`` and ``y'y``) and the product ``H g``.

    Every problem's pairs sit in the same slots: each step takes the next slot for all of them, and a
    problem that pushed nothing in that step (a rejected step) marks its slot invalid. Reading a pair is
    then a view, never a gather of rows from different slots (which, once problems fell out of step,
    cost a quarter of a probe's solve).
    """

    def __init__(self, K: int, D: int, m: int, like: torch.Tensor):
        self.m = m
        self.S = like.new_zeros(K, m, D)
        self.Y = like.new_zeros(K, m, D)
        self.sy = like.new_ones(K, m)
        self.yy = like.new_ones(K, m)
        self.valid = torch.zeros(K, m, dtype=torch.bool, device=like.device)
        self.steps = 0  # pushes so far (all problems together)

    @property
    def count(self) -> torch.Tensor:
        """``(K,)`` pairs each problem holds."""
        return self.valid.sum(1)

    def push(self, mask: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Append the pair ``(s, y)`` of every row where ``mask`` is set (the others' slot is invalid)."""
        slot = self.steps % self.m
        self.S[:, slot] = s
        self.Y[:, slot] = y
        self.sy[:, slot] = torch.where(mask, (s * y).sum(1), 1.0)
        self.yy[:, slot] = torch.where(mask, y.square().sum(1), 1.0)
        self.valid[:, slot] = mask
        self.steps += 1

    def reset(self, mask: torch.Tensor) -> None:
        self.valid[mask] = False

    def keep(self, rows: torch.Tensor) -> None:
        self.S, self.Y, self.sy, self.yy = self.S[rows], self.Y[rows], self.sy[rows], self.yy[rows]
        self.valid = self.valid[rows]

    def _pair(self, age: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``s, y (K, D)``, ``s'y (K,)`` and validity of every row's pair pushed ``age`` steps before the newest."""
        slot = (self.steps - 1 - age) % self.m
        return self.S[:, slot], self.Y[:, slot], self.sy[:, slot], self.valid[:, slot]

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g`` for every row: the two-loop recursion (Nocedal 1980), ``H0 = gamma I``, ``gamma = s'y / y'y``
        of the newest valid pair (1 without pairs)."""
        q = g.clone()
        alphas = []
        pairs = min(self.steps, self.m)
        gamma = torch.ones_like(q[:, 0])
        found = torch.zeros_like(q[:, 0], dtype=torch.bool)
        for age in range(pairs):  # newest to oldest
            s, y, sy, valid = self._pair(age)
            alpha = torch.where(valid, (s * q).sum(1) / sy, 0.0)
            q -= alpha[:, None] * y
            alphas.append(alpha)
            newest = valid & ~found
            gamma = torch.where(newest, sy / self.yy[:, (self.steps - 1 - age) % self.m], gamma)
            found |= newest
        r = q.mul_(gamma[:, None])
        for age in reversed(range(pairs)):  # oldest to newest
            s, y, sy, valid = self._pair(age)
            beta = (y * r).sum(1) / sy
            r += torch.where(valid, alphas[age] - beta, 0.0)[:, None] * s
        return r.neg_()


def fit_logreg(
    X: torch.Tensor,
    y: torch.Tensor,
    l2: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-2,
    init: LogRegFit | tuple[torch.Tensor, torch.Tensor] | None = None,
    history: int = 10,
    precondition: str | None = None,
) -> LogRegFit:
    """Solve ``P x G`` L2-regularised multinomial logistic regressions at once (see the module doc).

    X: ``(P, n, d)`` features (zero-padded); y: ``(P, n)`` labels in ``[0, C)``;
    l2: ``(P, G)`` L2 strengths (> 0; sklearn's ``C`` is ``1 / (l2 * n)``);
    sample_mask: ``(P, n)`` bool, False marks padding rows; class_mask: ``(P, C)``
    bool, False marks classes a problem does not have (their logit is -inf);
    tol: stop at ``||grad|| <= tol * l2 * ||W||`` (weights within a relative
    ``tol`` of the optimum); init: a previous fit or ``(W, b)`` to start from;
    precondition: ``"principal"`` rotates onto principal axes and scales them (same
    solutions, fewer iterations on anisotropic features, one eigendecomposition per
    feature matrix); ``"diagonal"`` scales the features' own axes (no rotation, for
    many small problems); None: neither.
    Runs on ``X.device`` in float32, or in float64 when ``X`` is float64 (float32 cannot reach
    tight tolerances on weakly regularised problems); ``W`` and ``b`` are returned in float32.
    """
    if X.dim() != 3:
        raise ValueError(f"X must be (P, n, d), got {tuple(X.shape)}")
    if precondition not in (None, *_PRECONDITION_POWER):
        raise ValueError(f"precondition must be None, 'principal' or 'diagonal', not {precondition!r}")
    P, n, d = X.shape
    streamed = isinstance(X, RowSource)
    if streamed and P != 1:
        raise ValueError("a RowSource holds one feature matrix (P = 1)")
    X = X if X.dtype == torch.float64 else X.to(torch.float32)
    device = X.device
    y = y.to(device=device, dtype=torch.long)
    l2 = torch.as_tensor(l2, dtype=X.dtype, device=device)
    if l2.dim() == 1:
        l2 = l2[None].expand(P, -1)
    if l2.dim() != 2 or l2.shape[0] != P or not bool((l2 > 0).all()):
        raise ValueError("l2 must be (P, G) and strictly positive")
    G = l2.shape[1]
    sample_mask = torch.ones(P, n, dtype=torch.bool, device=device) if sample_mask is None else sample_mask.to(device).bool()
    if num_classes is None:
        num_classes = class_mask.shape[1] if class_mask is not None else int(y[sample_mask].max()) + 1
    C = num_classes
    class_mask = torch.ones(P, C, dtype=torch.bool, device=device) if class_mask is None else class_mask.to(device).bool()
    y = torch.where(sample_mask, y, 0)
    if bool(((y < 0) | (y >= C))[sample_mask].any()):
        raise ValueError(f"labels must lie in [0, {C})")
    if not bool(class_mask.gather(1, y)[sample_mask].all()):
        raise ValueError("a valid sample has a label that class_mask marks absent")
    n_valid = sample_mask.sum(1).to(X.dtype)
    if bool((n_valid == 0).any()):
        raise ValueError("every problem needs at least one valid sample")

    work = P * G * n * min(n, d) * C
    with _threads_for(_PARALLEL_WORK if streamed else work, device):
        return _solve(X, y, l2, sample_mask, class_mask, n_valid, C, max_iter, tol, init, history, precondition)


@contextmanager
def _threads_for(work: int, device: torch.device):
    """Run small CPU solves single-threaded (restoring the thread count afterwards)."""
    if device.type != "cpu" or work >= _PARALLEL_WORK or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(X, y, l2, sample_mask, class_mask, n_valid, C, max_iter, tol, init, history, precondition) -> LogRegFit:
    P, n, d = X.shape
    G = l2.shape[1]
    device, dtype = X.device, X.dtype
    if isinstance(X, RowSource):
        basis = _streamed_basis(X, precondition)
        objective = _StreamedObjective(X, y[0], basis, class_mask[0], l2, G)
    else:
        basis = _basis(X, sample_mask, n_valid, precondition)
        objective = _Objective(basis.Z, y, sample_mask, class_mask, n_valid, l2, G)
    r1 = basis.width
    K, D = P * G, r1 * C
    every = torch.arange(K, device=device)
    # L-BFGS runs on v = W / scale. Without preconditioning the scale is 1; with it, each axis is scaled
    # so that the objective's curvature is about the same along every axis (see _axis_scale).
    scale = (_axis_scale(basis, l2, class_mask, _PRECONDITION_POWER[precondition]) if precondition
             else torch.ones(K, r1, 1, dtype=dtype, device=device))

    def evaluate(idx, v):
        """Loss and gradient with respect to ``v`` (both flat) of problems ``idx``."""
        sc = scale[idx]
        f, g = objective(idx, v.view(len(idx), r1, C) * sc)
        return f, (g * sc).view(len(idx), D)

    def weighted_grad_norm(g, idx):
        """||(grad_W, k grad_b)|| in the original coordinates (k: bias_weight)."""
        gr = g.view(len(g), r1, C) / scale[idx]
        return torch.sqrt(gr[:, :-1].flatten(1).square().sum(1) + (kappa[idx] * gr[:, -1].norm(dim=1)).square())

    def residual(v, g, idx, l2k, floor):
        """The convergence measure ||(grad_W, k grad_b)|| / max(l2 ||W||, floor), in the original coordinates."""
        W = v.view(len(v), r1, C) * scale[idx]
        return weighted_grad_norm(g, idx) / torch.maximum(l2k * W[:, :-1].flatten(1).norm(dim=1), floor)

    classes = class_mask.sum(1).repeat_interleave(G)  # (K,)
    kappa = bias_weight(classes, l2.reshape(-1), basis.scale.repeat_interleave(G))
    w = torch.zeros(K, D, dtype=dtype, device=device)
    f, g = evaluate(every, w)
    grad0 = weighted_grad_norm(g, every)  # the gradient at W=0, b=0
    floor = _FLOOR * grad0.clamp_min(torch.finfo(dtype).tiny)
    l2k = l2.reshape(-1)

    if init is not None:
        W0 = _to_basis(init, basis, P, G, C).reshape(K, r1, C) * class_mask.repeat_interleave(G, 0)[:, None, :]
        w = (W0 / scale).reshape(K, D)
        f, g = evaluate(every, w)

    # Final values of every problem; the loop works on the unfinished ones only (compacted as problems finish).
    iterations = torch.zeros(K, dtype=torch.long, device=device)
    gnorm = residual(w, g, every, l2k, floor)
    converged = gnorm <= tol
    w_out, f_out = w.clone(), f.clone()
    run = torch.nonzero(~converged & (max_iter > 0)).squeeze(1)
    w, f, g, l2k, floor = w[run], f[run], g[run], l2k[run], floor[run]
    memory = _History(len(run), D, history, w)
    its = iterations[run]
    # First step: steepest descent, moving by at most 1.
    direction = -g / g.norm(dim=1, keepdim=True).clamp_min(1.0)
    step = torch.ones(len(run), dtype=dtype, device=device)
    slack = 4 * torch.finfo(dtype).eps  # Armijo tolerance for float32 rounding

    for _ in range(4 * max_iter + 20):
        if len(run) == 0:
            break
        gtd = (g * direction).sum(1)
        trial = w + step[:, None] * direction
        f_try, g_try = evaluate(run, trial)
        armijo = f_try <= f + _ARMIJO_C1 * step.double() * gtd.double() + slack * f.abs()
        # Hager & Zhang's approximate Wolfe conditions: near the optimum the float32 loss is too noisy for the
        # Armijo test (it rejected about half the steps there), but the directional derivative is still accurate.
        gtd_try = (g_try * direction).sum(1)
        wolfe = (gtd_try <= (2 * _WOLFE_DELTA - 1) * gtd) & (gtd_try >= _WOLFE_SIGMA * gtd) \
            & (f_try <= f + _WOLFE_EPS * f.abs())
        ok = torch.isfinite(f_try) & (armijo | wolfe)

        # Accepted steps: update the memory and the iterate, then the next direction.
        s_vec, y_vec = trial - w, g_try - g
        memory.push(ok & ((s_vec * y_vec).sum(1) > 1e-10 * y_vec.square().sum(1)), s_vec, y_vec)
        w = torch.where(ok[:, None], trial, w)
        f = torch.where(ok, f_try, f)
        g = torch.where(ok[:, None], g_try, g)
        its = its + ok.long()
        rel = residual(w, g, run, l2k, floor)
        new_direction = memory.direction(g)
        uphill = ok & ((g * new_direction).sum(1) >= 0)  # numerical trouble: forget the history
        memory.reset(uphill)
        new_direction = torch.where(uphill[:, None], -g, new_direction)
        direction = torch.where(ok[:, None], new_direction, direction)

        # Rejected steps: backtrack (quadratic interpolation, kept within [0.1, 0.5] of the step).
        t = step.double()
        curve = 2 * (f_try - f - gtd.double() * t)
        t_quad = torch.where(torch.isfinite(curve) & (curve > 0), -gtd.double() * t**2 / curve, 0.1 * t)
        step = torch.where(ok, torch.ones_like(step), torch.minimum(torch.maximum(t_quad, 0.1 * t), 0.5 * t).to(dtype))
        failed = step < _MIN_STEP
        # A failed line search is retried once from a gradient step; a second failure ends the problem.
        give_up = failed & (memory.count == 0)
        retry = failed & ~give_up
        memory.reset(retry)
        direction = torch.where(retry[:, None], -g / g.norm(dim=1, keepdim=True).clamp_min(1.0), direction)
        step = torch.where(retry, torch.ones_like(step), step)

        done = (rel <= tol) | (its >= max_iter) | give_up
        if bool(done.any()):
            fin = run[done]
            w_out[fin], f_out[fin], iterations[fin] = w[done], f[done], its[done]
            gnorm[fin], converged[fin] = rel[done], rel[done] <= tol
            keep = torch.nonzero(~done).squeeze(1)
            run, w, f, g, l2k, floor, its, direction, step = (
                t_[keep] for t_ in (run, w, f, g, l2k, floor, its, direction, step))
            memory.keep(keep)
    if len(run):  # ran out of evaluations
        w_out[run], f_out[run], iterations[run], gnorm[run] = w, f, its, residual(w, g, run, l2k, floor)
    f = f_out

    W_basis = (w_out.view(K, r1, C) * scale).view(P, G, r1, C)
    W = W_basis[:, :, :-1] if basis.U is None else basis.U[:, None] @ W_basis[:, :, :-1]  # (P, G, d, C)
    b = (W_basis[:, :, -1] - (basis.mu[:, None, None, :] @ W).squeeze(2)) * class_mask[:, None, :]
    return LogRegFit(
        W=W.float().contiguous(),
        b=b.float(),
        iterations=iterations.view(P, G),
        converged=converged.view(P, G),
        loss=f.view(P, G),
        grad_norm=gnorm.view(P, G),
        class_mask=class_mask,
    )


def _axis_scale(basis: _Basis, l2: torch.Tensor, class_mask: torch.Tensor, power: float) -> torch.Tensor:
    """Per-problem scale ``(P*G, r+1, 1)`` of each axis (and of the bias, last) for L-BFGS's variables.

    Along a principal axis of variance ``e``, the objective's curvature is at most about ``a * e + l2``,
    where ``a`` is the softmax's (about ``1 / C`` at the start); along the centred bias it is about ``a``.
    Axis ``i`` is scaled by ``(e_i + C * l2) ** -power`` and the bias by 1, which evens out the
    curvatures L-BFGS sees (fully at power 1/2, see _PRECONDITION_POWER). On axes that are not
    principal the same scale evens out the diagonal of the curvature only.
    """
    P, G = l2.shape
    tau = l2 * class_mask.sum(1, keepdim=True).to(l2.dtype)  # (P, G)
    axes = (basis.variance[:, None, :] + tau[:, :, None]).pow(-power)  # (P, G, r)
    return torch.cat([axes, torch.ones_like(axes[..., :1])], dim=2).reshape(P * G, -1, 1)


def _to_basis(init, basis: _Basis, P: int, G: int, C: int) -> torch.Tensor:
    """A warm start ``(W, b)`` in original coordinates, expressed in the solver's basis ``(P, G, r+1, C)``."""
    W, b = (init.W, init.b) if isinstance(init, LogRegFit) else init
    W = W.to(basis.mu.device, basis.mu.dtype)
    b = b.to(basis.mu.device, basis.mu.dtype)
    d = basis.mu.shape[1]
    if tuple(W.shape) != (P, G, d, C) or tuple(b.shape) != (P, G, C):
        raise ValueError(f"init must be W {(P, G, d, C)} and b {(P, G, C)}, got {tuple(W.shape)} and {tuple(b.shape)}")
    b_centred = b + (basis.mu[:, None, None, :] @ W).squeeze(2)
    W_basis = W if basis.U is None else basis.U.transpose(1, 2)[:, None] @ W
    return torch.cat([W_basis, b_centred[:, :, None, :]], dim=2)


def logreg_objective(X, y, l2, W, b, class_mask=None) -> tuple[float, float]:
    """Objective and convergence measure (as :func:`fit_logreg` defines it) of one solution, in float64.

    ``X (n, d)``, ``y (n,)``, ``W (d, C)``, ``b (C,)``: for checking any solver's
    output (e.g. scikit-learn's) against the same standard. Like the solver, the
    gradient is taken in the centred parametrisation ``(x - mean x) W + b'``.
    """
    X, W, b = (torch.as_tensor(a).double() for a in (X, W, b))
    y = torch.as_tensor(y).long()
    mean = X.mean(0)
    X, b = X - mean, b + mean @ W
    C = W.shape[1]
    mask = torch.ones(C, dtype=torch.bool) if class_mask is None else torch.as_tensor(class_mask).bool()
    onehot = torch.nn.functional.one_hot(y, C).double()

    def value_and_grad(W, b):
        logp = torch.log_softmax((X @ W + b).masked_fill(~mask, float("-inf")), dim=1)
        dlogits = (logp.exp() - onehot) / len(y)
        loss = -logp.gather(1, y[:, None]).mean() + l2 / 2 * W.square().sum()
        return float(loss), torch.cat([(X.T @ dlogits + l2 * W).flatten(), dlogits.sum(0)])

    kappa = float(bias_weight(mask.sum(), torch.tensor(float(l2), dtype=torch.float64),
                              feature_scale(X[None], torch.tensor([float(len(y))], dtype=torch.float64))[0]))
    d = W.numel()

    def weighted(grad):
        return float(torch.sqrt(grad[:d].square().sum() + (kappa * grad[d:].norm()) ** 2))

    loss, grad = value_and_grad(W, b)
    _, grad0 = value_and_grad(torch.zeros_like(W), torch.zeros_like(b))
    scale = max(l2 * float(W.norm()), _FLOOR * weighted(grad0))
    return loss, weighted(grad) / scale
