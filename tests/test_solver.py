"""The batched logistic-regression solver against scikit-learn, padding/masks, determinism and convergence flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from vtbench.transfer.solver import fit_logreg, logreg_objective

L2S = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def _problem(n=240, d=30, C=4, seed=0, sep=0.7):
    """Overlapping Gaussian classes with unequal feature scales and an offset: not separable, not centred."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, d)) * sep
    y = np.arange(n) % C
    X = means[y] + rng.normal(size=(n, d)) * np.linspace(0.2, 2.0, d) + 3.0
    return X.astype(np.float32), y.astype(np.int64)


def _sklearn(X, y, l2):
    with warnings.catch_warnings(), threadpool_limits(1):  # tiny problem: threads only add wake-up latency
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-9, max_iter=20000).fit(X.astype(np.float64), y)
    return clf


PRECONDITION = pytest.mark.parametrize("precondition", [None, "principal", "diagonal"])


@PRECONDITION
@pytest.mark.parametrize("n,d,l2s", [(240, 30, L2S), (40, 60, L2S[2:])], ids=["n>d", "n<d (span reduction)"])
def test_matches_sklearn_for_several_l2(n, d, l2s, precondition):
    X, y = _problem(n=n, d=d)
    fit = fit_logreg(torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([l2s]), tol=1e-3,
                     precondition=precondition)
    assert fit.converged.all() and (fit.grad_norm <= 1e-3).all()
    assert fit.W.shape == (1, len(l2s), d, 4) and fit.b.shape == (1, len(l2s), 4)
    logits = fit.predict_logits(torch.from_numpy(X)[None])[0]
    for g, l2 in enumerate(l2s):
        clf = _sklearn(X, y, l2)
        W, b = fit.W[0, g].numpy(), fit.b[0, g].numpy()
        ours, rel_grad = logreg_objective(X, y, l2, W, b)
        theirs, _ = logreg_objective(X, y, l2, clf.coef_.T, clf.intercept_)
        assert rel_grad <= 1.2e-3  # recomputed in float64: the float32 solver really reached its tol
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
        # W is unique (strictly convex in W); the bias only up to a constant shift (softmax invariance).
        scale = np.abs(clf.coef_).max()
        np.testing.assert_allclose(W, clf.coef_.T, atol=3e-3 * scale)
        centred = clf.intercept_ - clf.intercept_.mean()
        np.testing.assert_allclose(b - b.mean(), centred, atol=3e-3 * max(1, scale, np.abs(centred).max()))
        agree = (logits[g].argmax(1).numpy() == clf.predict(X)).mean()
        assert agree >= 0.99


@PRECONDITION
def test_padding_and_masks_give_the_unpadded_solution(precondition):
    X, y = _problem(n=120, d=12, C=3)
    l2 = torch.tensor([[1e-3, 1e-1]])
    plain = fit_logreg(torch.from_numpy(X)[None], torch.from_numpy(y)[None], l2, tol=1e-3, precondition=precondition)

    # Same problem inside a bigger batch: 30 padding rows (garbage features, label 0), 5 zero feature
    # columns, two absent classes, next to an unrelated second problem.
    Xp = torch.zeros(2, 150, 17)
    Xp[0, :120, :12] = torch.from_numpy(X)
    Xp[0, 120:] = torch.randn(30, 17) * 50
    Xp[1] = torch.randn(150, 17)
    yp = torch.zeros(2, 150, dtype=torch.long)
    yp[0, :120] = torch.from_numpy(y)
    yp[1] = torch.arange(150) % 5
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[0, 120:] = False
    classes = torch.ones(2, 5, dtype=torch.bool)
    classes[0, 3:] = False
    padded = fit_logreg(Xp, yp, torch.cat([l2, l2]), sample_mask=mask, class_mask=classes, tol=1e-3,
                        precondition=precondition)

    W, b = padded.W[0], padded.b[0]
    torch.testing.assert_close(W[:, :12, :3], plain.W[0], atol=2e-4, rtol=1e-3)
    assert torch.all(W[:, 12:] == 0) and torch.all(W[:, :, 3:] == 0)
    torch.testing.assert_close(b[:, :3] - b[:, :3].mean(1, keepdim=True),
                               plain.b[0] - plain.b[0].mean(1, keepdim=True), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(padded.loss[0], plain.loss[0], rtol=1e-5, atol=1e-7)
    logits = padded.predict_logits(Xp[:, :120])
    assert torch.isinf(logits[0, :, :, 3:]).all() and torch.isfinite(logits[1]).all()


def test_batch_of_problems_equals_each_alone():
    problems = [_problem(n=100, d=10, C=3, seed=s) for s in range(3)]
    X = torch.stack([torch.from_numpy(p[0]) for p in problems])
    y = torch.stack([torch.from_numpy(p[1]) for p in problems])
    l2 = torch.tensor([[1e-3, 1e-1], [1e-2, 1.0], [1e-4, 1e-2]])
    together = fit_logreg(X, y, l2, tol=1e-3)
    for p in range(3):
        alone = fit_logreg(X[p : p + 1], y[p : p + 1], l2[p : p + 1], tol=1e-3)
        torch.testing.assert_close(together.W[p], alone.W[0], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(together.loss[p], alone.loss[0], rtol=1e-6, atol=1e-8)


def test_deterministic():
    X, y = _problem(n=150, d=20, C=5)
    args = (torch.from_numpy(X)[None].repeat(2, 1, 1), torch.from_numpy(y)[None].repeat(2, 1), torch.tensor([L2S, L2S[::-1]]))
    a, b = fit_logreg(*args), fit_logreg(*args)
    for field in ("W", "b", "iterations", "loss", "grad_norm"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@PRECONDITION
def test_convergence_flags_and_warm_start(precondition):
    X, y = _problem(n=200, d=25, C=4, sep=1.5)
    Xt, yt, l2 = torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([[1e-4, 1e-1]])
    capped = fit_logreg(Xt, yt, l2, max_iter=3, precondition=precondition)
    assert capped.iterations.tolist() == [[3, 3]] and not capped.converged.any()
    assert (capped.grad_norm > 1e-2).all()
    full = fit_logreg(Xt, yt, l2, precondition=precondition)
    assert full.converged.all() and (full.grad_norm <= 1e-2).all() and (full.iterations > 3).all()
    assert (full.loss < capped.loss).all()
    # The reported measure is the real one: recomputed in float64 from W and b.
    for g in range(2):
        _, rel_grad = logreg_objective(X, y, float(l2[0, g]), full.W[0, g], full.b[0, g])
        assert rel_grad == pytest.approx(float(full.grad_norm[0, g]), rel=0.05, abs=1e-4)
    warm = fit_logreg(Xt, yt, l2, init=full, precondition=precondition)
    assert warm.converged.all() and (warm.iterations == 0).all()


@pytest.mark.parametrize("precondition, rotated", [("principal", True), ("diagonal", False)])
def test_preconditioning_needs_fewer_iterations_on_anisotropic_features(precondition, rotated):
    # Feature scales spread over two decades, on random axes (principal) or on the coordinate axes
    # (diagonal: scaling them, without a rotation, is enough): plain L-BFGS crawls along the small ones.
    rng = np.random.default_rng(3)
    n, d, C = 400, 40, 5
    y = np.arange(n) % C
    X = (rng.normal(size=(C, d))[y] + rng.normal(size=(n, d))) * np.logspace(-1, 1, d)
    if rotated:
        X = X @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    args = (torch.tensor(X, dtype=torch.float32)[None], torch.from_numpy(y)[None], torch.tensor([[1e-3, 1e-1]]))
    plain = fit_logreg(*args, tol=1e-3)
    pre = fit_logreg(*args, tol=1e-3, precondition=precondition)
    assert plain.converged.all() and pre.converged.all()
    assert (3 * pre.iterations <= 2 * plain.iterations).all(), (pre.iterations, plain.iterations)  # a third fewer
    torch.testing.assert_close(pre.W, plain.W, atol=3e-3 * float(plain.W.abs().max()), rtol=0)


def test_unknown_preconditioning_is_refused():
    X, y = _problem(n=50, d=10, C=3)
    with pytest.raises(ValueError, match="precondition must be None, 'principal' or 'diagonal'"):
        fit_logreg(torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([[1e-2]]), precondition=True)


def test_reused_bases_give_the_same_fit_and_follow_changes(monkeypatch):
    from vtbench.transfer import solver

    X, y = _problem(n=150, d=20, C=5)
    Xt, yt, l2 = torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([[1e-2]])
    fresh = fit_logreg(Xt, yt, l2, precondition="principal")
    computed = []
    original = solver._compute_basis
    monkeypatch.setattr(solver, "_compute_basis", lambda *a: computed.append(1) or original(*a))
    with solver.reuse_bases():
        first = fit_logreg(Xt, yt, l2, precondition="principal")
        again = fit_logreg(Xt[:, :], yt, l2, precondition="principal")  # a new view of the same memory: reused
        assert len(computed) == 1
        Xt[0, 0, 0] += 1.0  # changed in place: computed anew
        changed = fit_logreg(Xt, yt, l2, precondition="principal")
        assert len(computed) == 2
    assert solver._reused_bases is None
    for fit in (first, again):
        assert torch.equal(fit.W, fresh.W) and torch.equal(fit.b, fresh.b)
    assert not torch.equal(changed.W, fresh.W)


def test_rejects_bad_input():
    X, y = _problem(n=20, d=3, C=2)
    with pytest.raises(ValueError, match="strictly positive"):
        fit_logreg(torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="labels"):
        fit_logreg(torch.from_numpy(X)[None], torch.from_numpy(y)[None], torch.tensor([[1.0]]), num_classes=1)


def test_principal_axes_of_near_constant_features_do_not_fail():
    # A random-init DINOv2 ViT's first class token stored in float16: 335 of 384 columns constant, the rest a
    # few levels each. float32 eigh of their covariance fails to converge; the solver must not.
    rng = np.random.default_rng(0)
    X = np.zeros((898, 384))
    X[:, ::7][:, :49] = rng.integers(0, 2, (898, 49))
    Xt = torch.from_numpy(X).float()
    Xt = (Xt - Xt.mean(0)) / torch.where(Xt.std(0) > 0, Xt.std(0), torch.ones(1))
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.eigh((Xt.T @ Xt / len(Xt))[None])
    y = torch.from_numpy(rng.integers(0, 10, 898))
    fit = fit_logreg(Xt[None], y[None], torch.tensor([[1e-2]]), num_classes=10, precondition="principal")
    assert torch.isfinite(fit.W).all() and bool(fit.converged.all())


def test_constant_features_converge_to_the_class_prior():
    # No signal at all (every column constant): the measure must stay finite and the bias fit the class frequencies.
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    X = torch.full((1, 60, 5), 3.0, dtype=torch.float64)  # float64, as the probe finishes
    fit = fit_logreg(X, y[None], torch.tensor([[1.0, 1e-3]]), num_classes=3, precondition="principal", tol=1e-5)
    assert torch.isfinite(fit.grad_norm).all() and bool(fit.converged.all())
    prior = torch.softmax(fit.predict_logits(X[:, :1])[0, :, 0], dim=-1)
    assert torch.allclose(prior, torch.tensor([0.5, 1 / 3, 1 / 6]).expand(2, -1), atol=1e-4)
