"""Linear probes and k-NN on cached token ensembles: ``run_probe`` (the API behind ``vt probe``).

Protocols (``docs/probe.md`` has the details and how each differs from the paper):

- ``default``: multinomial logistic regression, features standardised with the
  training statistics, L2 strength chosen on the validation split (the official
  one, else a seeded stratified 20% of train) from :data:`L2_GRID`, then refit
  on train+val and evaluated on test. Solved by :func:`vtbench.transfer.solver.fit_logreg`:
  every token spec batched, preconditioned on the features' principal axes, the grid coarse
  to fine (warm starts), then one batched refit.
- ``sklearn``: the same selection and refit with scikit-learn's ``LogisticRegression``
  (lbfgs) as the solver, ``C = 1 / (l2 * n)``: the reference backend.
- ``ipvit``: the IPViT paper's protocol: a linear head trained with AdamW
  (lr 5e-4, weight decay 0.05, constant lr, 10 epochs, batch 256) on the paper's
  training splits, tested after every epoch. ``top1`` is the last epoch;
  ``top1_max_over_epochs`` is what the paper reported (it peeks at test).
- ``knn``: k-NN with temperature-weighted votes on L2-normalised features,
  k chosen on the validation split (see :mod:`vtbench.transfer.knn`).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from vtbench.errors import VTError
from vtbench.progress import Progress
from vtbench.tokens import TokenSpec, parse_spec, per_block_specs
from vtbench.transfer import knn as knn_lib
from vtbench.transfer import memory
from vtbench.cache import CacheSet
from vtbench import options
from vtbench.options import Opt
from vtbench.protocols import get_protocol, probe_protocols
from vtbench.settings import SELECT_OPTIONS, SettingsQuery
from vtbench.transfer.features import VAL_FRACTION, Split, feature_width, stratified_holdout
from vtbench.transfer.metrics import accuracy, classification_metrics
from vtbench.transfer.solver import CRITERION, LogRegFit, RowSource, fit_logreg, logreg_objective, reuse_bases

# L2 strengths (objective: mean cross-entropy + l2/2 ||W||^2 on standardised features), half a
# decade apart from 1e-6 (almost unregularised) to 100 (beyond it the probe is, up to scale, the
# class-mean classifier it tends to as l2 grows). sklearn's C is 1 / (l2 * n).
L2_GRID = tuple(float(f"{10 ** (e / 2):.6g}") for e in range(-12, 5))
# Both backends are held to the solver's criterion (see vtbench.transfer.solver): ||grad|| <= tol * l2 ||W||,
# i.e. the weights are within a relative tol of the optimum, for every grid value and the refit alike. At
# 1e-3 and 1e-4, solutions of nearly separable problems (l2 <= 1e-5 on shared DTD) that both met the
# criterion still put one of the 130 validation images on different sides, enough to change the selected
# l2 where the validation curve is flat; at 1e-5 the two backends agree on every grid value.
SELECT_TOL, REFIT_TOL = 1e-5, 1e-5
FLOAT32_TOL = 1e-2  # the solver runs in float32 down to this, then in float64
SOLVER_MAX_ITER = 1000
SKLEARN_MAX_ITER = 10000
SKLEARN_REFINEMENTS = 8  # times sklearn's tol may be divided by 10 (warm-starting) to meet our tol
IPVIT = {"optimizer": "AdamW", "lr": 5e-4, "weight_decay": 0.05, "epochs": 10, "batch_size": 256, "schedule": "constant"}
PROGRESS_EVERY_S = 10.0  # long loops (specs, ipvit epochs) report progress at most this often

PROTOCOLS = tuple(probe_protocols())  # the registered ones (vtbench.protocols)

# `vt probe`'s options and a suite's probe keys.
PROBE_OPTIONS = (
    options.MODEL,
    options.DATASET,
    Opt("tokens", str, None, "Token spec(s): --tokens 'cls[-1]' 'cls[-4:]' (or repeat --tokens).", short="-t",
        multiple=True),
    Opt("protocol", str, None, f"{', '.join(PROTOCOLS)}; repeat for several (default: default).", short="-p",
        multiple=True),
    Opt("per_block", bool, False, "Also probe every block's cls and patch (or stage) token alone.", flag="--per-block"),
    Opt("seed", int, 0, "Seed for the held-out validation split, ipvit's init and shuffling."),
    Opt("seeds", int, None, "Several seeds, one result each: --seeds 0 1 2 (the leaderboard shows their mean ± std).",
        multiple=True),
    options.WEIGHTS_PICK,
    *SELECT_OPTIONS,
    options.ROOT_PICK,
    Opt("standardize", bool, True, "default/sklearn: standardise features with train statistics.",
        flag="--standardize/--no-standardize"),
    Opt("max_memory", str, None, "Memory for a spec's features, e.g. 16G: beyond it, default, knn and ncc read "
        "them from the cache in row chunks (same results; default: half the machine's memory)."),
    options.CACHE_DIR,
    options.RESULTS_DIR,
    options.SKIP_EXISTING,
    options.DEVICE,
)


@dataclass
class Task:
    """What one protocol run gets: the specs, the splits, and the run settings."""

    specs: list[TokenSpec]
    train: Split  # what the model is fitted on (before the refit on train+val)
    val: Split | None  # the selection split (None for ipvit)
    test: Split
    num_classes: int
    seed: int
    device: torch.device
    standardize: bool
    say: Callable[[str], None] = lambda msg: None  # progress lines for long runs
    max_memory: int | None = None  # bytes (None: vtbench.transfer.memory's default)

    def chunk_rows(self, split: Split, spec: TokenSpec, kind: str = "logistic") -> int | None:
        """Rows per chunk when ``split``'s features of ``spec`` are streamed (over the memory budget), else None."""
        return memory.chunk_rows(len(split), split.width(spec), memory.memory_budget(self.max_memory), kind)

    def refit_split(self) -> Split:
        """train+val as one split (the refit after selection)."""
        both = Split(self.train.names + self.val.names, self.train.caches + self.val.caches)
        if self.train.rows is None and self.val.rows is None:
            return both
        # Held-out validation: train and val are two parts of the same cache.
        return Split(self.train.names, self.train.caches, np.sort(np.concatenate([self.train.rows, self.val.rows])))


def _stack(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Per-spec features ``(n, d_p)`` zero-padded to ``(P, n, max d)``: zero columns get zero weight under L2."""
    width = max(a.shape[1] for a in arrays)
    out = torch.zeros(len(arrays), len(arrays[0]), width, dtype=torch.float32)
    for p, a in enumerate(arrays):
        out[p, :, : a.shape[1]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out.to(device)


@dataclass
class _Standardizer:
    """``(Z - mean) / std`` with the statistics of one training set (per spec and column)."""

    mean: torch.Tensor  # (P, 1, d)
    std: torch.Tensor  # (P, 1, d)

    @classmethod
    def of_chunks(cls, chunks, width: int, enabled: bool, device) -> "_Standardizer":
        """The statistics of features read in row chunks (float64 sums about the first chunk's mean; the
        unbiased std, as :meth:`of`)."""
        if not enabled:
            return cls(torch.zeros(1, 1, width, device=device), torch.ones(1, 1, width, device=device))
        shift, count = None, 0
        total = torch.zeros(width, dtype=torch.float64)
        squares = torch.zeros(width, dtype=torch.float64)
        for chunk in chunks:
            c = torch.from_numpy(chunk).double()
            shift = c.mean(0) if shift is None else shift
            c -= shift
            count += len(c)
            total += c.sum(0)
            squares += c.square().sum(0)
        mean = shift + total / count
        std = ((squares - total.square() / count) / max(1, count - 1)).clamp_min(0).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(mean.float()[None, None].to(device), std.float()[None, None].to(device))

    @classmethod
    def of(cls, X: torch.Tensor, enabled: bool) -> "_Standardizer":
        """The statistics of ``X``; the identity when disabled."""
        if not enabled:
            return cls(X.new_zeros(X.shape[0], 1, X.shape[2]), X.new_ones(X.shape[0], 1, X.shape[2]))
        std = X.std(1, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant (e.g. padding) columns stay as they are
        return cls(X.mean(1, keepdim=True), std)

    def __call__(self, Z: torch.Tensor) -> torch.Tensor:
        return (Z - self.mean) / self.std

    def carry(self, W: torch.Tensor, b: torch.Tensor, source: "_Standardizer") -> tuple[torch.Tensor, torch.Tensor]:
        """A linear head ``(W (P, d, C), b (P, C))`` fitted on ``source``-standardised features, rewritten
        for this standardisation (the same function of the raw features)."""
        W_here = (self.std / source.std).transpose(1, 2) * W
        b_here = b + (((self.mean - source.mean) / source.std) @ W).squeeze(1)
        return W_here, b_here


def _labels(split: Split, device) -> torch.Tensor:
    return torch.from_numpy(split.labels).long().to(device)


def _solver_fit(backend: str, X: torch.Tensor, y: torch.Tensor, l2: torch.Tensor, dims: list[int],
                num_classes: int, class_mask: torch.Tensor, tol: float, init=None) -> LogRegFit:
    """Fit ``P x G`` logistic regressions with the vtbench solver or with scikit-learn (one problem at a time).

    ``init`` (``W (P, G, d, C)``, ``b (P, G, C)``) warm-starts the vtbench solver; scikit-learn starts from zero.
    """
    P = X.shape[0]
    if backend == "vtbench":
        features = (X, X.to(torch.float64))  # float32 for the rough phase, float64 to finish (see _batched_fit)
        with reuse_bases():  # the grid's runs share the features' principal axes
            if init is None and l2.shape[1] > 1:
                return _staggered_grid_fit(features, y, l2, num_classes, class_mask, tol)
            return _batched_fit(features, y, l2, num_classes, class_mask, tol, init)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    G = l2.shape[1]
    n, d = X.shape[1], X.shape[2]
    present = torch.nonzero(class_mask).squeeze(1).cpu().numpy()
    W = torch.zeros(P, G, d, num_classes)
    b = torch.zeros(P, G, num_classes)
    iterations = torch.zeros(P, G, dtype=torch.long)
    converged = torch.ones(P, G, dtype=torch.bool)
    loss = torch.zeros(P, G, dtype=torch.float64)
    grad_norm = torch.zeros(P, G, dtype=torch.float64)
    y_np = y.cpu().numpy()
    for p in range(P):
        Xp = X[p, :, : dims[p]].cpu().double().numpy()  # float64: sklearn keeps float32 input in float32
        for g in range(G):
            clf = LogisticRegression(C=1.0 / (float(l2[p, g]) * n), tol=_sklearn_tol(Xp, y_np, present),
                                     max_iter=SKLEARN_MAX_ITER, warm_start=True)
            # Tighten sklearn's tolerance (continuing from its solution) until the solution meets our criterion.
            for _ in range(SKLEARN_REFINEMENTS + 1):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    clf.fit(Xp, y_np)
                iterations[p, g] += int(np.max(clf.n_iter_))
                coef, intercept = clf.coef_, clf.intercept_
                if len(present) == 2:  # sklearn's binary case: one weight vector for class 1
                    coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
                W[p, g, : dims[p]][:, present] = torch.from_numpy(coef.T).float()
                b[p, g, present] = torch.from_numpy(intercept).float()
                loss[p, g], grad_norm[p, g] = logreg_objective(Xp, y_np, float(l2[p, g]), W[p, g, : dims[p]], b[p, g],
                                                               class_mask.cpu())
                if grad_norm[p, g] <= tol:
                    break
                clf.tol /= 10
            warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
            converged[p, g] = bool(grad_norm[p, g] <= tol) and not warned
    return LogRegFit(W=W, b=b, iterations=iterations, converged=converged, loss=loss, grad_norm=grad_norm,
                     class_mask=class_mask[None].expand(P, -1).cpu())


_FIT_FIELDS = ("W", "b", "iterations", "converged", "loss", "grad_norm")


def _batched_fit(features, y, l2, num_classes, class_mask, tol, init=None) -> LogRegFit:
    """``fit_logreg`` over every feature matrix and grid value given: in float32 to FLOAT32_TOL, then, for a
    tighter ``tol``, on from there in float64 (float32 stalls above 1e-3 on weakly regularised problems).
    ``features`` is the pair (float32, float64) of one ``(P, n, d)`` tensor."""
    X, X64 = features
    P = X.shape[0]

    def fit(X, tol, init):
        return fit_logreg(X, y[None].expand(P, -1), l2, init=init, class_mask=class_mask[None].expand(P, -1),
                          num_classes=num_classes, tol=tol, max_iter=SOLVER_MAX_ITER, precondition="principal")

    rough = fit(X, max(tol, FLOAT32_TOL), init)
    if tol >= FLOAT32_TOL:
        return rough
    fine = fit(X64, tol, rough)
    return replace(fine, iterations=rough.iterations + fine.iterations)


def _concat_grid(fits: list[LogRegFit]) -> LogRegFit:
    """Fits of the same feature matrices joined along the grid axis."""
    if len(fits) == 1:
        return fits[0]
    joined = {f: torch.cat([getattr(fit, f) for fit in fits], dim=1) for f in _FIT_FIELDS}
    return LogRegFit(**joined, class_mask=fits[0].class_mask)


def _staggered_grid_fit(features, y, l2, num_classes, class_mask, tol) -> LogRegFit:
    """The grid coarse to fine: every other L2 value first (recursively; the coarsest level, at most 3
    values, is a chain from the strongest regularisation down, each started from the last solution and
    the strongest from zero), then the values in between in one batched run, each started from the
    mean of its two neighbours' solutions. Solutions change smoothly along the grid, so the warm-started
    problems need far fewer iterations (on Lite0 Caltech-101 the grid took 3x less time than one run
    from zero). Every problem is still solved to the same criterion; every token spec stays batched."""
    G = l2.shape[1]
    if G < 4:  # the coarsest level: a chain from the strongest regularisation down, each from the last
        fits, init = [], None
        for g in sorted(range(G), key=lambda g: -float(l2[0, g])):
            fits.append((g, _batched_fit(features, y, l2[:, [g]], num_classes, class_mask, tol, init)))
            init = (fits[-1][1].W, fits[-1][1].b)
        return _concat_grid([fit for _, fit in sorted(fits, key=lambda item: item[0])])
    first, second = list(range(0, G, 2)), list(range(1, G, 2))
    fit1 = _staggered_grid_fit(features, y, l2[:, first], num_classes, class_mask, tol)
    lower = torch.tensor([g // 2 for g in second])
    upper = torch.tensor([min(g // 2 + 1, len(first) - 1) for g in second])
    W0 = (fit1.W[:, lower] + fit1.W[:, upper]) / 2
    b0 = (fit1.b[:, lower] + fit1.b[:, upper]) / 2
    fit2 = _batched_fit(features, y, l2[:, second], num_classes, class_mask, tol, init=(W0, b0))
    order = torch.argsort(torch.tensor(first + second))
    joined = _concat_grid([fit1, fit2])
    return LogRegFit(**{f: getattr(joined, f)[:, order] for f in _FIT_FIELDS}, class_mask=joined.class_mask)


def _sklearn_tol(X: np.ndarray, y: np.ndarray, present: np.ndarray) -> float:
    """sklearn's starting ``tol`` (a bound on max |grad|): 1e-4 * max |grad at 0|.

    sklearn's default (1e-4, absolute) stops long before convergence when the
    gradient is small from the start, e.g. with hundreds of classes; a relative
    start, tightened until the solution meets our tol, holds it to our standard.
    """
    onehot = (y[:, None] == present[None, :]).astype(X.dtype)
    residual = 1.0 / len(present) - onehot  # softmax(0) - onehot
    grad0 = np.concatenate([(X.T @ residual).ravel(), residual.sum(0)]) / len(y)
    return 1e-4 * float(np.abs(grad0).max())


def logistic(task: Task, backend: str) -> list[dict]:
    """default / sklearn, one token spec at a time: each spec's solve is then exactly the one it gets
    alone, whatever else the call probes (batched specs differed in the last digits, which weakly
    regularised problems turned into different test predictions)."""
    progress = Progress(task.say, len(task.specs), "spec", PROGRESS_EVERY_S)
    out = []
    for spec in task.specs:
        out.append(_logistic_spec(task, spec, backend))
        progress.step(str(spec))
    return out


@dataclass
class Fitted:
    """A probe fitted on one token spec: ``predict`` scores any features of that spec ((n, d) -> (n, C) scores,
    so clean and perturbed test sets alike); ``outcome`` says how it was fitted (selection, solver, timings)."""

    predict: Callable[[np.ndarray], torch.Tensor]
    outcome: dict
    label_map: np.ndarray | None = None  # the score column of each dataset class, where not the class index

    def score(self, split: Split, spec: TokenSpec, rows: int | None = None) -> torch.Tensor:
        """Scores ``(n, C)`` of a split's features of ``spec``, read ``rows`` rows at a time (None: at once)."""
        return torch.cat([self.predict(chunk) for chunk in split.chunks(spec, rows)])

    def labels(self, labels: np.ndarray) -> torch.Tensor:
        """A split's labels as columns of the scores."""
        labels = np.asarray(labels)
        return torch.from_numpy(labels if self.label_map is None else self.label_map[labels]).long()


def fit_logistic(task: Task, spec: TokenSpec, backend: str) -> Fitted:
    """Choose l2 on val from L2_GRID and refit on train+val: one spec. Beyond the memory budget the vtbench
    solver streams the features from the cache in row chunks (the same optimum)."""
    dev, C = task.device, task.num_classes
    rows = _logistic_chunk_rows(task, spec, backend)
    t0 = time.perf_counter()
    X_tr, scale = _standardised(task.train, spec, rows, dev, task.standardize)
    X_va, _ = _standardised(task.val, spec, rows, dev, task.standardize, scale)
    dims = [X_tr.shape[2]]
    y_tr, y_va = _labels(task.train, dev), _labels(task.val, dev)
    grid = torch.tensor(L2_GRID, device=dev)[None]
    class_mask = torch.bincount(y_tr, minlength=C) > 0
    fit = _solver_fit(backend, X_tr, y_tr, grid, dims, C, class_mask, SELECT_TOL)
    val_top1 = _grid_accuracy(fit, X_va, y_va)  # (G,)
    g = select_l2(val_top1.tolist())
    t_select = time.perf_counter() - t0
    passes = _passes(X_tr) + _passes(X_va)
    del X_tr, X_va

    t0 = time.perf_counter()
    both = task.refit_split()
    X_all, scale_all = _standardised(both, spec, rows, dev, task.standardize)
    y_all = _labels(both, dev)
    chosen = torch.tensor([[L2_GRID[g]]], device=dev)
    refit_mask = torch.bincount(y_all, minlength=C) > 0
    # The refit starts from the chosen grid solution (train+val is mostly train: it lies close to the optimum).
    W0, b0 = scale_all.carry(fit.W[:, g].to(dev), fit.b[:, g].to(dev), scale)
    refit = _solver_fit(backend, X_all, y_all, chosen, dims, C, refit_mask, REFIT_TOL, init=(W0[:, None], b0[:, None]))
    t_refit = time.perf_counter() - t0
    passes += _passes(X_all)

    def predict(features: np.ndarray) -> torch.Tensor:
        return refit.predict_logits(scale_all(_stack([features], dev)))[0, 0]

    solver = _solver_description(backend, dev)
    # grad_norm: each solution's convergence measure (vtbench's criterion, for both backends).
    solver["selection"] = {"iterations": fit.iterations[0].tolist(), "converged": fit.converged[0].tolist(),
                           "grad_norm": [float(v) for v in fit.grad_norm[0]]}
    solver["refit"] = {"iterations": int(refit.iterations[0, 0]), "converged": bool(refit.converged[0, 0]),
                       "grad_norm": float(refit.grad_norm[0, 0]), "loss": float(refit.loss[0, 0])}
    if rows is not None:
        solver["streamed"] = {"chunk_rows": rows, "max_memory_bytes": memory.memory_budget(task.max_memory),
                              "passes": passes}
    return Fitted(predict, {
        "metrics": {"val_top1": float(val_top1[g])},
        "selection": {"parameter": "l2", "grid": list(L2_GRID), "val_top1": val_top1.tolist(),
                      "chosen": L2_GRID[g], "sklearn_C_refit": 1.0 / (L2_GRID[g] * len(y_all)),
                      "rule": SELECTION_RULE},
        "solver": solver,
        "standardize": task.standardize,
        "timings": {"select_s": t_select, "refit_s": t_refit, "shared_by_specs": 1},
    })


def _logistic_chunk_rows(task: Task, spec: TokenSpec, backend: str) -> int | None:
    """Rows per streamed chunk for this spec's logistic probe, or None (in memory). Only the vtbench solver streams."""
    rows = task.chunk_rows(task.refit_split(), spec)
    if rows is not None and backend != "vtbench":
        task.say(f"  {spec}: the {backend} solver holds its features in memory, beyond --max-memory")
        return None
    if rows is not None:
        task.say(f"  {spec}: streaming features from the cache, {rows} rows at a time (beyond --max-memory)")
    return rows


def _standardised(split: Split, spec: TokenSpec, rows: int | None, dev, standardize: bool,
                  scale: "_Standardizer | None" = None):
    """``(features, standardizer)``: a split's features of ``spec`` standardised with ``scale`` (default: their
    own statistics), as a ``(1, n, d)`` tensor, or with ``rows`` as a RowSource read from the cache in chunks."""
    if rows is None:
        X = _stack([split.features(spec)], dev)
        scale = scale or _Standardizer.of(X, standardize)
        return scale(X), scale
    scale = scale or _Standardizer.of_chunks(split.chunks(spec, rows), split.width(spec), standardize, dev)

    def read():
        for chunk in split.chunks(spec, rows):
            yield scale(torch.from_numpy(chunk).to(dev)[None])[0]

    return RowSource(len(split), split.width(spec), read, device=dev), scale


def _passes(X) -> int:
    return X.passes[0] if isinstance(X, RowSource) else 0


def _grid_accuracy(fit: LogRegFit, X, y: torch.Tensor) -> torch.Tensor:
    """Top-1 (%) of every grid solution ``(G,)`` on standardised features (a tensor or a RowSource)."""
    if not isinstance(X, RowSource):
        return accuracy(fit.predict_logits(X), y).cpu()[0]
    correct = torch.zeros(fit.W.shape[1], dtype=torch.float64)
    for start, chunk in X.chunks():
        predicted = fit.predict_logits(chunk[None])[0].argmax(-1)  # (G, m)
        correct += (predicted == y[start : start + len(chunk)]).sum(1).double().cpu()
    return correct / X.n * 100


def _logistic_spec(task: Task, spec: TokenSpec, backend: str) -> dict:
    """Choose l2 on val from L2_GRID, refit on train+val, evaluate on test: one spec."""
    fitted = fit_logistic(task, spec, backend)
    logits = fitted.score(task.test, spec, task.chunk_rows(task.test, spec))
    outcome = fitted.outcome
    outcome["metrics"] = dict(classification_metrics(logits.cpu(), _labels(task.test, "cpu")), **outcome["metrics"])
    return outcome


# How the l2 is picked from the validation accuracies, for both backends (and in words for records).
SELECTION_RULE = "max val top-1; ties -> largest l2"


def select_l2(val_top1: Sequence[float]) -> int:
    """Index into L2_GRID of the best validation top-1; ties go to the strongest regularisation."""
    return max(range(len(L2_GRID)), key=lambda g: (float(val_top1[g]), L2_GRID[g]))


def _solver_description(backend: str, dev) -> dict:
    if backend == "vtbench":
        return {"name": "vtbench.transfer.solver.fit_logreg",
                "method": "L-BFGS over the grid's problems at once, per-problem line search, preconditioned on the "
                          "features' principal axes; the grid coarse to fine with warm starts, the refit "
                          "warm-started from the chosen grid solution; one token spec at a time",
                "tol": {"selection": SELECT_TOL, "refit": REFIT_TOL}, "criterion": CRITERION,
                "max_iter": SOLVER_MAX_ITER, "device": str(dev)}
    import sklearn

    return {"name": f"sklearn.linear_model.LogisticRegression (lbfgs, sklearn {sklearn.__version__})",
            "tol": {"selection": SELECT_TOL, "refit": REFIT_TOL},
            "criterion": CRITERION + " (checked in float64; sklearn's own tol starts at 1e-4 * max |grad at 0| and "
                         f"is divided by 10, warm-starting, until it holds, at most {SKLEARN_REFINEMENTS} times)",
            "max_iter": SKLEARN_MAX_ITER}


def ipvit(task: Task) -> list[dict]:
    """The paper's head: AdamW on a linear layer per spec, all specs trained side by side, test after each epoch."""
    dev, C = task.device, task.num_classes
    feats = [task.train.features(s) for s in task.specs]
    dims = [f.shape[1] for f in feats]
    P = len(task.specs)
    t0 = time.perf_counter()
    X = _stack(feats, dev)
    y = _labels(task.train, dev)
    X_te = _stack([task.test.features(s) for s in task.specs], dev)
    y_te = _labels(task.test, "cpu")
    W = torch.zeros(P, X.shape[2], C, device=dev)
    b = torch.zeros(P, C, device=dev)
    for p, d in enumerate(dims):
        # nn.Linear's default init, from the same seeded generator for every spec (so batching changes nothing).
        gen = torch.Generator().manual_seed(task.seed)
        bound = 1.0 / d ** 0.5
        W[p, :d] = (torch.rand(C, d, generator=gen) * 2 - 1).mul_(bound).T.to(dev)
        b[p] = (torch.rand(C, generator=gen) * 2 - 1).mul_(bound).to(dev)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.AdamW([W, b], lr=IPVIT["lr"], weight_decay=IPVIT["weight_decay"])
    shuffle = torch.Generator().manual_seed(task.seed)
    n = len(y)
    epochs, last_said = [], t0
    for epoch in range(IPVIT["epochs"]):
        now = time.perf_counter()
        if epoch and now - last_said > PROGRESS_EVERY_S:  # long runs (large datasets on a CPU) say how far they are
            left = (now - t0) / epoch * (IPVIT["epochs"] - epoch)
            task.say(f"  epoch {epoch}/{IPVIT['epochs']} after {now - t0:.0f}s, about {left:.0f}s left")
            last_said = now
        order = torch.randperm(n, generator=shuffle).to(dev)
        for lo in range(0, n, IPVIT["batch_size"]):
            rows = order[lo : lo + IPVIT["batch_size"]]
            logits = X[:, rows] @ W + b[:, None, :]
            # Sum over specs of each spec's mean loss: every head gets exactly its own gradient.
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, C), y[rows].repeat(P), reduction="sum") / len(rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            epochs.append((X_te @ W + b[:, None, :]).cpu())
    elapsed = time.perf_counter() - t0
    out = []
    for p in range(P):
        per_epoch = [float(accuracy(e[p], y_te)) for e in epochs]
        metrics = classification_metrics(epochs[-1][p], y_te)
        metrics.update(top1_last_epoch=per_epoch[-1], top1_max_over_epochs=max(per_epoch),
                       best_epoch=int(np.argmax(per_epoch)) + 1, top1_per_epoch=per_epoch)
        out.append({
            "metrics": metrics,
            "selection": {"note": "no selection: fixed hyperparameters; top1_max_over_epochs peeks at test (as the paper did)"},
            "solver": dict(IPVIT, init="nn.Linear default (seeded)", shuffle=f"torch.randperm per epoch (seed {task.seed})",
                           device=str(dev)),
            "timings": {"fit_s": elapsed, "shared_by_specs": P},
        })
    return out


def fit_knn(task: Task, spec: TokenSpec) -> Fitted:
    """k-NN: k chosen on val with train as the bank; the fitted probe scores with train+val as the bank.
    Beyond the memory budget the banks and queries are read from the cache in row chunks."""
    dev, C = task.device, task.num_classes
    t0 = time.perf_counter()
    both = task.refit_split()
    rows = task.chunk_rows(both, spec, "knn")
    if rows is not None:
        task.say(f"  {spec}: k-NN over the bank in chunks of {rows} rows (beyond --max-memory)")
    ks = knn_lib.capped_ks(len(task.train))
    val_scores = knn_lib.knn_scores(_bank(task.train, spec, rows), task.train.labels, task.val.chunks(spec, rows),
                                    ks, C, dev)
    y_va = _labels(task.val, "cpu")
    val_top1 = {k: float(accuracy(s, y_va)) for k, s in val_scores.items()}
    chosen = max(ks, key=lambda k: (val_top1[k], -k))  # ties -> the smaller k
    bank, bank_labels = _bank(both, spec, rows), both.labels

    def predict(features: np.ndarray) -> torch.Tensor:
        return knn_lib.knn_scores(bank, bank_labels, features, [chosen], C, dev)[chosen]

    solver = {"name": "knn", "backend": knn_lib.backend_name(dev), "temperature": knn_lib.TEMPERATURE,
              "similarity": "cosine (L2-normalised features)", "votes": "sum of exp(sim / T)"}
    if rows is not None:
        solver["streamed"] = {"chunk_rows": rows, "max_memory_bytes": memory.memory_budget(task.max_memory)}
    return Fitted(predict, {
        "selection": {"parameter": "k", "grid": ks, "val_top1": [val_top1[k] for k in ks], "chosen": chosen,
                      "rule": "max val top-1; ties -> smallest k"},
        "solver": solver,
        "timings": {"fit_s": time.perf_counter() - t0, "shared_by_specs": 1},
    })


def _bank(split: Split, spec: TokenSpec, rows: int | None):
    """A k-NN bank: the features in memory, or (streamed) a function that reads them in row chunks."""
    return split.features(spec) if rows is None else (lambda: split.chunks(spec, rows))


def knn(task: Task) -> list[dict]:
    """k-NN: k chosen on val with train as the bank; test with train+val as the bank (every k of the grid
    reported beside the chosen one)."""
    dev, C = task.device, task.num_classes
    both = task.refit_split()
    out = []
    for spec in task.specs:
        t0 = time.perf_counter()
        fitted = fit_knn(task, spec)
        chosen = fitted.outcome["selection"]["chosen"]
        test_ks = sorted(set(knn_lib.capped_ks(len(both))) | {chosen})
        rows = task.chunk_rows(both, spec, "knn")
        test_scores = knn_lib.knn_scores(_bank(both, spec, rows), both.labels, task.test.chunks(spec, rows),
                                         test_ks, C, dev)
        y_te = _labels(task.test, "cpu")
        metrics = classification_metrics(test_scores[chosen], y_te)
        metrics["k"] = chosen
        metrics.update({f"top1_k{k}": float(accuracy(s, y_te)) for k, s in test_scores.items()})
        fitted.outcome["timings"]["fit_s"] = time.perf_counter() - t0
        out.append({"metrics": metrics, **fitted.outcome})
    return out


def _run_protocol(protocol, task: Task) -> list[dict]:
    """One outcome per spec. Specs whose features are identical (a ViT's ``prelogits`` is ``cls[-1]``) are
    run once: the protocol is a function of the features, so the twin's outcome is exactly what its own run gives."""
    twin_of = _feature_twins(task)
    unique = [s for s in task.specs if str(s) not in twin_of]
    outcomes = dict(zip(map(str, unique), protocol.run(replace(task, specs=unique))))
    out = []
    for spec in map(str, task.specs):
        if spec in twin_of:
            twin = copy.deepcopy(outcomes[twin_of[spec]])
            twin["timings"]["same_features_as"] = twin_of[spec]
            task.say(f"  {spec}: the same features as {twin_of[spec]}, whose result it shares")
            out.append(twin)
        else:
            out.append(outcomes[spec])
    return out


def _feature_twins(task: Task) -> dict[str, str]:
    """``{spec: earlier spec}`` for each spec whose train, val and test features equal an earlier spec's."""
    first: dict[tuple, str] = {}
    twins = {}
    for spec in task.specs:
        splits = [split for split in (task.train, task.val, task.test) if split is not None]
        key = tuple(split.digest(spec, task.chunk_rows(split, spec)) for split in splits)
        if key in first:
            twins[str(spec)] = first[key]
        else:
            first[key] = str(spec)
    return twins


def check_probe_options(*, protocol: str | Sequence[str] = "default") -> list[str]:
    """The protocols asked for, once each; VTError for an unknown one (suites check theirs with it when they load)."""
    protocols = list(dict.fromkeys([protocol] if isinstance(protocol, str) else protocol))
    if not protocols:
        raise VTError(f"no protocol given; choose from {', '.join(PROTOCOLS)}")
    for name in protocols:
        get_protocol(name)
    return protocols


def make_protocol(name: str, standardize: bool = True):
    """The registered probe protocol ``name``, with the run's parameters it takes."""
    import inspect

    cls = type(get_protocol(name))
    takes = inspect.signature(cls.__init__).parameters
    return cls(**({"standardize": standardize} if "standardize" in takes else {}))


def _unique_specs(specs: list[TokenSpec]) -> list[TokenSpec]:
    seen, out = set(), []
    for s in specs:
        if str(s) not in seen:
            seen.add(str(s))
            out.append(s)
    return out


def run_probe(
    model: str,
    dataset: str,
    tokens: str | Sequence[str] = (),
    protocol: str | Sequence[str] = "default",
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    per_block: bool = False,
    cache_dir=None,
    results_dir=None,
    weights: str | None = None,
    settings: SettingsQuery | dict | None = None,
    data_root=None,
    skip_existing: bool = False,
    device: str | None = None,
    standardize: bool = True,
    max_memory: str | int | None = None,
    log: Callable[[str], None] | None = None,
    **select,
) -> list[dict]:
    """Train and evaluate probes on cached features of ``model`` on ``dataset``, one record per (spec, protocol, seed).

    ``tokens`` are token specs (``cls[-1]``, ``cls[-4:]+patch[-1]``, see :mod:`vtbench.tokens`);
    ``per_block`` adds every block's single-block spec. Caches are looked up in
    ``cache_dir`` (default ``$VT_CACHE``), narrowed by ``weights``, extraction ``settings`` (a
    :class:`~vtbench.settings.SettingsQuery`, or its fields as keywords: ``input_size=224``) and
    ``data_root`` (the dataset root given to ``vt extract``). ``seeds`` runs every probe once per seed
    (default: just ``seed``). Features beyond ``max_memory`` (bytes, or ``"16G"``; default half the
    machine's memory) are streamed from the cache by ``default``, ``knn`` and ``ncc``. Every record is
    saved to the results store (``results_dir``, default ``$VT_RESULTS`` or ``./results``) and returned. With ``skip_existing``, a result already stored is
    returned as stored, marked ``"skipped": True``, instead of being recomputed.
    """
    from vtbench.allocator import keep_freed_memory
    from vtbench.data import dataset_info
    from vtbench.device import resolve_device
    from vtbench.paths import results_dir as default_results_dir
    from vtbench.paths import writable_dir

    keep_freed_memory()  # as vt does: batched solves reuse large blocks

    say = log or (lambda msg: None)
    protocols = [make_protocol(name, standardize) for name in check_probe_options(protocol=protocol)]
    seeds = check_seeds(seed if seeds is None else seeds)
    specs = _requested_specs(tokens, per_block)
    budget = memory.memory_budget(max_memory)
    dev = resolve_device(device)
    info = dataset_info(dataset)
    results_root = writable_dir(default_results_dir(results_dir), "--results")

    caches = CacheSet(model, dataset, cache_dir=cache_dir, weights=weights, settings=SettingsQuery.of(settings, **select),
                      data_root=data_root, kinds=set().union(*(s.kinds for s in specs)) if specs else set())
    try:
        plans = _open_splits(caches, protocols, info)
        specs = _final_specs(caches, specs, per_block)
        records = []
        for run_seed in seeds:
            for proto, splits in _hold_out(caches, plans, info, run_seed).items():
                records += _run_and_record(proto, splits, caches, specs, run_seed, dev, results_root, skip_existing,
                                           budget, say)
        return records
    finally:
        caches.close()


def _requested_specs(tokens, per_block: bool) -> list[TokenSpec]:
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    if not tokens and not per_block:
        raise VTError("no token specs: pass --tokens (e.g. 'cls[-1]' 'cls[-4:]') or --per-block")
    return [parse_spec(t) for t in tokens]


def check_seeds(seeds: int | Sequence[int]) -> list[int]:
    """The seeds asked for, once each and in order; VTError for none or a negative one."""
    seeds = list(dict.fromkeys([seeds] if isinstance(seeds, int) else [int(s) for s in seeds]))
    if not seeds or any(s < 0 for s in seeds):
        raise VTError(f"seeds must be one or more integers >= 0 (got {seeds or 'none'})")
    return seeds


def _open_splits(caches: CacheSet, protocols: list, info) -> dict:
    """``{protocol: (train split names, val split name or None)}``, with every cache they need opened,
    so a missing or mismatched cache fails before any training."""
    plans = {}
    for proto in protocols:
        val = None
        if proto.needs_val:
            val = info.val_split
            if info.generic:  # generic sources have a val split only where one is on disk
                val = "val" if caches.has("val") else None
        plans[proto] = (proto.train_splits(info), val)
    for train_names, val_name in plans.values():
        for name in train_names + ([val_name] if val_name else []) + [info.test_split]:
            caches.get(name)
    return plans


def _final_specs(caches: CacheSet, specs: list[TokenSpec], per_block: bool) -> list[TokenSpec]:
    """The specs to probe (with the per-block ones), each checked against every opened cache."""
    ref = caches.reference
    if per_block:
        specs = specs + per_block_specs(ref.kinds)
    specs = _unique_specs(specs)
    caches.check(kinds=set().union(*(s.kinds for s in specs)))
    for spec in specs:
        spec.resolve(ref.kinds)  # unknown kind / block out of range -> VTError before any training
    return specs


def _hold_out(caches: CacheSet, plans: dict, info, seed: int) -> dict:
    """``{protocol: (train, val, test)}``; a protocol that selects on a validation split where the dataset has
    none gets a seeded stratified part of train."""
    tasks = {}
    class_names = caches.reference.class_names
    for proto, (train_names, val_name) in plans.items():
        train = caches.split(train_names)
        test = caches.split([info.test_split])
        if not proto.needs_val:
            val = None
        elif val_name is not None:
            val = caches.split([val_name])
        else:
            tr_rows, va_rows = stratified_holdout(train.labels, seed, class_names=class_names)
            desc = f"{VAL_FRACTION:.0%} of {'+'.join(train_names)} (stratified, seed {seed})"
            val = train.subset(va_rows, desc)
            train = train.subset(tr_rows, train_names)
        tasks[proto] = (train, val, test)
    return tasks


def _record_base(caches: CacheSet, proto, splits: tuple, seed: int) -> dict:
    """Everything a record of this protocol and seed says before its spec and outcome."""
    from vtbench import results as store

    train, val, test = splits
    names = {"train": train.description or train.names, "test": test.names}
    refs = {"train": train.cache_refs(), "test": test.cache_refs()}
    if val is not None:
        names["val"] = val.description or val.names
        if val.rows is None:
            refs["val"] = val.cache_refs()
    ref = caches.reference
    return store.new_record("probe", ref.meta, protocol=proto.name, variant=proto.variant(), seed=seed, caches=refs,
                            num_classes=len(ref.class_names), splits=names,
                            n={"train": len(train), "val": len(val) if val is not None else 0, "test": len(test)})


def _run_and_record(proto, splits, caches, specs, seed, dev, results_root, skip_existing, budget, say) -> list[dict]:
    """Run one protocol on every spec not yet stored, and save one record per spec (stored ones are returned
    as they are, marked ``skipped``)."""
    from vtbench import results as store

    base = _record_base(caches, proto, splits, seed)
    stored = {str(s): store.stored_record(results_root, dict(base, tokens=str(s))) if skip_existing else None
              for s in specs}
    todo = [s for s in specs if stored[str(s)] is None]
    for spec in specs:
        if stored[str(spec)] is not None:
            say(f"skip {proto.name} {spec} seed {seed}: result exists")
    done = _run(proto, splits, caches, todo, seed, dev, budget, say) if todo else {}
    records = []
    for spec in specs:
        record = stored[str(spec)]
        if record is None:
            record = dict(base, tokens=str(spec), feature_dim=feature_width(caches.reference, spec), **done[str(spec)])
            record["_path"] = str(store.save(results_root, record))
        records.append(record)
    return records


def _run(proto, splits, caches, specs, seed, dev, budget, say) -> dict[str, dict]:
    """``{spec: outcome}`` of one protocol run over ``specs``."""
    train, val, test = splits
    ref = caches.reference
    say(f"{proto.name}: {len(specs)} token spec(s) on {ref.meta['dataset']} ({len(train)} train, "
        f"{len(val) if val is not None else 0} val, {len(test)} test), seed {seed}")
    standardize = getattr(proto, "standardize", True)
    t0 = time.perf_counter()
    task = Task(specs, train, val, test, len(ref.class_names), seed, dev, standardize, say, budget)
    outcomes = _run_protocol(proto, task)
    total = time.perf_counter() - t0
    for outcome in outcomes:
        outcome["timings"]["protocol_total_s"] = total
    return dict(zip(map(str, specs), outcomes))
