"""Batched multinomial logistic regression: many independent L2-regularised problems in one run.

:func:`fit_logreg` solves ``P x G`` problems at once: ``P`` feature matrices
(e.g. one per token spec, or one per few-shot episode) times ``G`` L2 strengths.
The objective of problem ``(p, g)`` is::

    mean over valid samples i of  cross_entropy(x_i W + b, y_i)  +  l2[p, g] / 2 * ||W||^2

with the bias unpenalised. This is exactly scikit-learn's ``LogisticRegression``
(lbfgs, multinomial) objective divided by ``n``: ``C`` there corresponds to
``l2 = 1 / (C * n)``.

How it works (all steps exact reparametrisations, so the optimum is unchanged):

1. Centre the features (the bias absorbs the mean) and rotate them into the
   eigenbasis of their covariance (or of the Gram matrix when ``n < d``, which
   also reduces the problem to the at most ``n`` directions the optimum can use:
   an L2-regularised solution lies in the span of the samples). A rotation
   preserves ``||W||``, so the penalty is unchanged; directions with zero
   variance (e.g. zero padding) are dropped, their optimal weight is 0.
2. Run a batched L-BFGS in that basis. Every problem keeps its own history,
   step size and Armijo backtracking line search, and stops on its own; the
   initial inverse Hessian of each iteration is the diagonal
   ``1 / (lambda_j * a_c + l2)``: feature variance ``lambda_j`` times the current
   mean softmax curvature ``a_c = mean_i p_ic (1 - p_ic)`` of class ``c``, plus the
   penalty. In the eigenbasis this diagonal is a good Hessian model, which is
   what makes weakly regularised problems converge in tens of iterations.
3. One function evaluation serves every unfinished problem: for each feature
   matrix ``p``, the weights of its unfinished grid values are stacked along the
   class axis, so the logits and the gradient are one ``(n x d) @ (d x G*C)``
   matmul each. Finished problems drop out of the batch.

Convergence: ``||grad||_2 <= tol * ||grad at W=0, b=0||_2`` (a relative gradient
norm, invariant to the feature scale). ``converged`` says whether a problem got
there within ``max_iter`` L-BFGS iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Problems whose logits tensor would exceed this many elements are evaluated in chunks.
_MAX_LOGITS = 1 << 25
# Directions whose variance is below this fraction of the largest are dropped (exactly
# zero directions, e.g. zero padding, measure ~1e-16 in float64).
_RANK_RTOL = 1e-10
_ARMIJO_C1 = 1e-4


@dataclass
class LogRegFit:
    """Solutions of ``fit_logreg``: one ``(W, b)`` per problem ``(p, g)``, plus how the solver fared."""

    W: torch.Tensor  # (P, G, d, C)
    b: torch.Tensor  # (P, G, C)
    iterations: torch.Tensor  # (P, G) int64: L-BFGS iterations (accepted steps)
    converged: torch.Tensor  # (P, G) bool: relative gradient norm reached tol
    loss: torch.Tensor  # (P, G) float64: final objective
    grad_norm: torch.Tensor  # (P, G): final ||grad|| / ||grad at zero||
    class_mask: torch.Tensor | None = None  # (P, C) bool, classes that can be predicted

    def predict_logits(self, X: torch.Tensor) -> torch.Tensor:
        """Logits ``(P, G, m, C)`` of features ``X`` ``(P, m, d)`` under every solution."""
        P, G, d, C = self.W.shape
        W = self.W.to(X.device)
        logits = X.to(W.dtype) @ W.permute(0, 2, 1, 3).reshape(P, d, G * C)
        logits = logits.reshape(P, -1, G, C).permute(0, 2, 1, 3) + self.b.to(X.device)[:, :, None, :]
        if self.class_mask is not None:
            logits = logits.masked_fill(~self.class_mask.to(X.device)[:, None, None, :], float("-inf"))
        return logits


@dataclass
class _Basis:
    """Centred, rotated features with a trailing bias column: ``Z = [(X - mu) U, 1]``."""

    Z: torch.Tensor  # (P, n, r + 1), padding rows zero
    U: torch.Tensor  # (P, d, r), orthonormal columns (zero columns where a problem has rank < r)
    mu: torch.Tensor  # (P, d)
    variance: torch.Tensor  # (P, r + 1): per-direction variance, 1 for the bias column


def _basis(X: torch.Tensor, sample_mask: torch.Tensor, n_valid: torch.Tensor) -> _Basis:
    P, n, d = X.shape
    w = sample_mask.to(X.dtype)
    mu = (X * w[..., None]).sum(1) / n_valid[:, None]
    Xc = (X - mu[:, None, :]) * w[..., None]
    Xc64 = Xc.double()
    if n < d:
        # Gram route: X_c = V diag(sqrt(s)) U^T with U = X_c^T V / sqrt(s).
        s, V = torch.linalg.eigh(Xc64 @ Xc64.transpose(1, 2))
    else:
        s, V = torch.linalg.eigh(Xc64.transpose(1, 2) @ Xc64)
    s, V = s.flip(-1), V.flip(-1)  # descending
    keep = s > _RANK_RTOL * s[:, :1].clamp_min(1e-300)
    r = max(1, int(keep.sum(1).max()))
    s, V, keep = s[:, :r].clamp_min(0) * keep[:, :r], V[:, :, :r] * keep[:, None, :r], keep[:, :r]
    if n < d:
        inv_sqrt = torch.where(keep, s.clamp_min(1e-300).rsqrt(), torch.zeros_like(s))
        U = (Xc64.transpose(1, 2) @ V) * inv_sqrt[:, None, :]
        Zr = V * s.sqrt()[:, None, :]
    else:
        U = V
        Zr = Xc64 @ U
    Z = torch.cat([Zr.to(X.dtype), w[..., None]], dim=2)
    variance = torch.cat([(s / n_valid.double()[:, None]).to(X.dtype), torch.ones(P, 1, dtype=X.dtype, device=X.device)], 1)
    return _Basis(Z=Z.contiguous(), U=U.to(X.dtype), mu=mu, variance=variance)


class _Problems:
    """The batched objective: value, gradient and softmax curvature for any subset of problems."""

    def __init__(self, basis, y, sample_mask, class_mask, n_valid, l2, G):
        self.Z, self.y, self.G = basis.Z, y, G
        self.row_weight = sample_mask.to(basis.Z.dtype) / n_valid[:, None]  # (P, n)
        self.sample_mask, self.class_mask = sample_mask, class_mask
        self.l2 = l2.reshape(-1)  # (P*G,)
        r1 = basis.Z.shape[2]
        self.penalised = torch.ones(r1, 1, dtype=basis.Z.dtype, device=basis.Z.device)
        self.penalised[-1] = 0  # the bias row

    def penalty(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.l2[idx][:, None, None] * self.penalised * w

    def evaluate(self, idx: torch.Tensor, w: torch.Tensor):
        """``(loss (K,) float64, grad (K, r+1, C), curvature (K, C))`` for problems ``idx`` (sorted) at ``w``."""
        K, r1, C = w.shape
        p_of = torch.div(idx, self.G, rounding_mode="floor")
        ps, counts = torch.unique_consecutive(p_of, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(ps), device=idx.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(K, device=idx.device) - starts[group]
        A = int(counts.max())
        n = self.Z.shape[1]
        chunk = max(1, _MAX_LOGITS // max(1, n * A * C))
        nll = torch.empty(K, dtype=torch.float64, device=w.device)
        grad = torch.empty_like(w)
        curvature = torch.empty(K, C, dtype=w.dtype, device=w.device)
        for lo in range(0, len(ps), chunk):
            sel = slice(lo, lo + chunk)
            pc = ps[sel]
            members = (group >= lo) & (group < lo + len(pc))
            g_loc, r_loc = group[members] - lo, rank[members]
            Wpad = w.new_zeros(len(pc), A, r1, C)
            Wpad[g_loc, r_loc] = w[members]
            Zc = self.Z[pc]
            logits = (Zc @ Wpad.permute(0, 2, 1, 3).reshape(len(pc), r1, A * C)).reshape(len(pc), n, A, C)
            logits.masked_fill_(~self.class_mask[pc][:, None, None, :], float("-inf"))
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            yc = self.y[pc][:, :, None, None].expand(-1, -1, A, 1)
            picked = logp.gather(-1, yc).squeeze(-1)  # (p, n, A)
            valid = self.sample_mask[pc][:, :, None]
            weight = self.row_weight[pc][:, :, None]
            nll_pa = -(torch.where(valid, picked, 0.0).double() * weight.double()).sum(1)  # (p, A)
            prob = logp.exp_()
            curv = (prob * (1 - prob) * weight[..., None]).sum(1)  # (p, A, C)
            prob.scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=prob.dtype))
            prob.mul_(weight[..., None])
            gpad = (Zc.transpose(1, 2) @ prob.reshape(len(pc), n, A * C)).reshape(len(pc), r1, A, C)
            grad[members] = gpad.permute(0, 2, 1, 3)[g_loc, r_loc]
            nll[members] = nll_pa[g_loc, r_loc]
            curvature[members] = curv[g_loc, r_loc]
        grad += self.penalty(idx, w)
        loss = nll + 0.5 * self.l2[idx].double() * (self.penalised * w).double().pow(2).sum((1, 2))
        return loss, grad, curvature


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


_PRECOND = "curvature"
_GAMMA = False


def _two_loop(g, S, Yh, rho, count, newest, H0):
    """L-BFGS direction ``-H g`` per problem, from each problem's own ring-buffered history."""
    m = S.shape[1]
    rows = torch.arange(len(g), device=g.device)
    q = g.clone()
    alphas = []
    for i in range(m):
        slot = (newest - i) % m
        valid = (i < count).to(g.dtype)
        alpha = rho[rows, slot] * _dot(S[rows, slot], q) * valid
        q -= alpha[:, None, None] * Yh[rows, slot]
        alphas.append((slot, valid, alpha))
    if _GAMMA:
        last = newest % m
        yv = Yh[rows, last]
        gam = torch.where(count > 0, 1.0 / (rho[rows, last] * _dot(yv, H0 * yv)).clamp_min(1e-30), torch.ones_like(rho[:, 0]))
        H0 = H0 * gam[:, None, None]
    r = H0 * q
    for slot, valid, alpha in reversed(alphas):
        beta = rho[rows, slot] * _dot(Yh[rows, slot], r) * valid
        r += (alpha - beta)[:, None, None] * S[rows, slot]
    return -r


def fit_logreg(
    X: torch.Tensor,
    y: torch.Tensor,
    l2: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    init: LogRegFit | tuple[torch.Tensor, torch.Tensor] | None = None,
    history: int = 10,
) -> LogRegFit:
    """Solve ``P x G`` L2-regularised multinomial logistic regressions at once (see the module doc).

    X: ``(P, n, d)`` features (zero-padded); y: ``(P, n)`` labels in ``[0, C)``;
    l2: ``(P, G)`` L2 strengths (> 0; sklearn's ``C`` is ``1 / (C * n)``);
    sample_mask: ``(P, n)`` bool, False marks padding rows; class_mask: ``(P, C)``
    bool, False marks classes a problem does not have (their logit is -inf);
    init: a previous fit or ``(W, b)`` to warm-start from. Runs on ``X.device``;
    deterministic for a given input and device.
    """
    if X.dim() != 3:
        raise ValueError(f"X must be (P, n, d), got {tuple(X.shape)}")
    P, n, d = X.shape
    X = X.float()
    device = X.device
    y = y.to(device=device, dtype=torch.long)
    l2 = torch.as_tensor(l2, dtype=torch.float32, device=device)
    if l2.dim() == 1:
        l2 = l2[None].expand(P, -1)
    if l2.shape[0] != P or not bool((l2 > 0).all()):
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

    basis = _basis(X, sample_mask, n_valid)
    problems = _Problems(basis, y, sample_mask, class_mask, n_valid, l2, G)
    r1 = basis.Z.shape[2]
    K = P * G
    every = torch.arange(K, device=device)
    variance = basis.variance.repeat_interleave(G, 0)[:, :, None]  # (K, r+1, 1)
    l2k = problems.penalised * l2.reshape(-1)[:, None, None]
    cmask = class_mask.repeat_interleave(G, 0)[:, None, :].to(X.dtype)

    w = X.new_zeros(K, r1, C)
    f, g, curv = problems.evaluate(every, w)
    scale = g.norm(dim=(1, 2)).clamp_min(torch.finfo(X.dtype).tiny)  # gradient norm at W=0, b=0
    if init is not None:
        w = _to_basis(init, basis, P, G, C).reshape(K, r1, C) * cmask
        f, g, curv = problems.evaluate(every, w)

    def inverse_hessian_diag(idx):
        if _PRECOND == "curvature":
            return cmask[idx] / (variance[idx] * curv[idx][:, None, :] + l2k[idx]).clamp_min(1e-12)
        if _PRECOND == "bohning":
            return cmask[idx] / (variance[idx] * 0.5 + l2k[idx]).clamp_min(1e-12)
        if _PRECOND == "invC":
            return cmask[idx] / (variance[idx] / C + l2k[idx]).clamp_min(1e-12)
        return cmask[idx] * torch.ones_like(variance[idx])

    m = history
    S = X.new_zeros(K, m, r1, C)
    Yh = X.new_zeros(K, m, r1, C)
    rho = X.new_zeros(K, m)
    count = torch.zeros(K, dtype=torch.long, device=device)
    newest = torch.full((K,), -1, dtype=torch.long, device=device)
    iterations = torch.zeros(K, dtype=torch.long, device=device)
    gnorm = g.norm(dim=(1, 2)) / scale
    converged = gnorm <= tol
    direction = -inverse_hessian_diag(every) * g
    gtd = _dot(g, direction)
    step = torch.ones(K, dtype=X.dtype, device=device)
    active = ~converged & (iterations < max_iter)
    eps_f = 4 * torch.finfo(X.dtype).eps

    max_evals = 4 * max_iter + 20
    for _ in range(max_evals):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        t = step[idx]
        trial = w[idx] + t[:, None, None] * direction[idx]
        f_try, g_try, curv_try = problems.evaluate(idx, trial)
        f_old = f[idx]
        ok = f_try <= f_old + _ARMIJO_C1 * t.double() * gtd[idx].double() + eps_f * f_old.abs()
        ok &= torch.isfinite(f_try)

        acc = idx[ok]
        if len(acc):
            s_vec = trial[ok] - w[acc]
            y_vec = g_try[ok] - g[acc]
            sy = _dot(s_vec, y_vec)
            store = sy > 1e-10 * _dot(y_vec, y_vec).clamp_min(1e-30)
            slot = (newest[acc] + 1) % m
            st, sl = acc[store], slot[store]
            S[st, sl], Yh[st, sl], rho[st, sl] = s_vec[store], y_vec[store], 1.0 / sy[store]
            newest[st] = sl
            count[st] = (count[st] + 1).clamp_max(m)
            w[acc], f[acc], g[acc], curv[acc] = trial[ok], f_try[ok], g_try[ok], curv_try[ok]
            iterations[acc] += 1
            gnorm[acc] = g[acc].norm(dim=(1, 2)) / scale[acc]
            converged[acc] = gnorm[acc] <= tol
            go = acc[~converged[acc] & (iterations[acc] < max_iter)]
            if len(go):
                direction[go] = _two_loop(g[go], S[go], Yh[go], rho[go], count[go], newest[go], inverse_hessian_diag(go))
                gtd[go] = _dot(g[go], direction[go])
                step[go] = 1.0
                bad = go[gtd[go] >= 0]
                if len(bad):  # not a descent direction (numerical trouble): restart from the preconditioned gradient
                    count[bad] = 0
                    direction[bad] = -inverse_hessian_diag(bad) * g[bad]
                    gtd[bad] = _dot(g[bad], direction[bad])
            active[acc[converged[acc] | (iterations[acc] >= max_iter)]] = False

        rej = idx[~ok]
        if len(rej):
            t_rej = t[~ok].double()
            gd = gtd[rej].double()
            denom = 2 * (f_try[~ok] - f[rej] - gd * t_rej)
            t_quad = torch.where(torch.isfinite(denom) & (denom > 0), -gd * t_rej**2 / denom, 0.1 * t_rej)
            t_new = torch.minimum(torch.maximum(t_quad, 0.1 * t_rej), 0.5 * t_rej).to(X.dtype)
            step[rej] = t_new
            tiny = rej[t_new < 1e-10]
            if len(tiny):
                # The line search failed: drop the history once; if that already happened, give up.
                fresh = tiny[count[tiny] > 0]
                stuck = tiny[count[tiny] == 0]
                count[fresh] = 0
                direction[fresh] = -inverse_hessian_diag(fresh) * g[fresh]
                gtd[fresh] = _dot(g[fresh], direction[fresh])
                step[fresh] = 1.0
                active[stuck] = False

    W_rot = w.reshape(P, G, r1, C)
    W = basis.U[:, None] @ W_rot[:, :, :-1]  # (P, G, d, C)
    b = W_rot[:, :, -1] - (basis.mu[:, None, None, :] @ W).squeeze(2)
    b = b * class_mask[:, None, :]
    return LogRegFit(
        W=W,
        b=b,
        iterations=iterations.reshape(P, G),
        converged=converged.reshape(P, G),
        loss=f.reshape(P, G),
        grad_norm=gnorm.reshape(P, G),
        class_mask=class_mask,
    )


def _to_basis(init, basis: _Basis, P: int, G: int, C: int) -> torch.Tensor:
    """A warm start ``(W, b)`` in original coordinates, expressed in the rotated basis."""
    W, b = (init.W, init.b) if isinstance(init, LogRegFit) else init
    W = W.to(basis.U.device, basis.U.dtype)
    b = b.to(basis.U.device, basis.U.dtype)
    if W.shape[:2] != (P, G) or W.shape[-1] != C:
        raise ValueError(f"init W must be {(P, G, basis.U.shape[1], C)}, got {tuple(W.shape)}")
    W_rot = basis.U.transpose(1, 2)[:, None] @ W  # (P, G, r, C)
    b_rot = b + (basis.mu[:, None, None, :] @ W).squeeze(2)
    return torch.cat([W_rot, b_rot[:, :, None, :]], dim=2)
