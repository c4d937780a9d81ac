"""Linear CKA between blocks, in one streaming pass over row chunks (float64, memory independent of N).

Kornblith et al. (2019), feature-space linear CKA, biased and debiased (Nguyen et al. 2021's unbiased
HSIC): for centred X, Y, ``CKA = ||Yᵀ X||_F² / (||Xᵀ X||_F ||Yᵀ Y||_F)``. :class:`CKAAccumulator` keeps
only sums over rows (per block: Σx, Σ||x||², Σ||x||² x; per pair: Σ x_p x_qᵀ, Σ ||x_p||² ||x_q||²), so
the centred quantities, and the debiased estimator's row-norm terms, follow exactly at the end without
a second pass.
"""

from __future__ import annotations

import numpy as np
import torch


class CKAAccumulator:
    """Sums over rows for the CKA of every pair of ``dims``-wide matrices (blocks) seen row chunk by chunk."""

    def __init__(self, dims: list[int]):
        self.dims = list(dims)
        self.n = 0
        B = len(dims)
        self.s = [torch.zeros(d, dtype=torch.float64) for d in dims]  # Σ x
        self.t = torch.zeros(B, dtype=torch.float64)  # Σ ||x||²
        self.a = torch.zeros(B, B, dtype=torch.float64)  # Σ ||x_p||² ||x_q||²
        self.v = [[torch.zeros(d, dtype=torch.float64) for d in dims] for _ in dims]  # v[p][q] = Σ ||x_p||² x_q
        self.g = {(p, q): torch.zeros(dims[p], dims[q], dtype=torch.float64) for p in range(B) for q in range(p, B)}

    def add(self, blocks: list[np.ndarray]) -> None:
        """One chunk of rows: ``blocks[p]`` is (rows, dims[p])."""
        xs = [torch.from_numpy(np.asarray(b, dtype=np.float64)) for b in blocks]
        norms = torch.stack([(x * x).sum(1) for x in xs])  # (B, rows)
        self.n += xs[0].shape[0]
        self.t += norms.sum(1)
        self.a += norms @ norms.T
        for p, x in enumerate(xs):
            self.s[p] += x.sum(0)
            for q, y in enumerate(xs):
                self.v[p][q] += norms[p] @ y
            for q in range(p, len(xs)):
                self.g[(p, q)] += x.T @ xs[q]

    def _cross(self, p: int, q: int) -> torch.Tensor:
        """Centred X_pᵀ X_q."""
        g = self.g[(p, q)] if p <= q else self.g[(q, p)].T
        return g - torch.outer(self.s[p], self.s[q]) / self.n

    def _row_products(self, p: int, q: int) -> float:
        """Σ_i ||x_p,i - μ_p||² ||x_q,i - μ_q||²: the debiased estimator's row-norm term, from the sums."""
        n, mu_p, mu_q = self.n, self.s[p] / self.n, self.s[q] / self.n
        m_p, m_q = float(mu_p @ mu_p), float(mu_q @ mu_q)
        g = self.g[(p, q)] if p <= q else self.g[(q, p)].T
        return float(self.a[p, q] - 2 * self.v[p][q] @ mu_q - 2 * self.v[q][p] @ mu_p + m_q * self.t[p] + m_p * self.t[q]
                     + 4 * mu_p @ g @ mu_q - 2 * m_q * (self.s[p] @ mu_p) - 2 * m_p * (self.s[q] @ mu_q) + n * m_p * m_q)

    def _squared_norm(self, p: int) -> float:
        """Σ_i ||x_p,i - μ_p||²."""
        mu = self.s[p] / self.n
        return float(self.t[p] - 2 * self.s[p] @ mu + self.n * (mu @ mu))

    def _debiased(self, xty: float, p: int, q: int) -> float:
        n = self.n
        return (xty - n / (n - 2) * self._row_products(p, q)
                + self._squared_norm(p) * self._squared_norm(q) / ((n - 1) * (n - 2)))

    def cka(self, p: int, q: int, debiased: bool = False) -> float:
        """Linear CKA of blocks ``p`` and ``q`` (debiased: Nguyen et al.'s estimator, as Kornblith's code)."""
        dot = float(torch.linalg.matrix_norm(self._cross(p, q)) ** 2)
        norm_p = float(torch.linalg.matrix_norm(self._cross(p, p)))
        norm_q = float(torch.linalg.matrix_norm(self._cross(q, q)))
        if not debiased:
            return dot / (norm_p * norm_q)
        return self._debiased(dot, p, q) / np.sqrt(self._debiased(norm_p ** 2, p, p) * self._debiased(norm_q ** 2, q, q))

    def matrix(self, debiased: bool = False) -> np.ndarray:
        """CKA of every pair of blocks, (B, B)."""
        B = len(self.dims)
        out = np.eye(B)
        for p in range(B):
            for q in range(p + 1, B):
                out[p, q] = out[q, p] = self.cka(p, q, debiased)
            if debiased:
                out[p, p] = self.cka(p, p, True)
        return out


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False, chunk: int | None = None) -> float:
    """Linear CKA of two (N, d) matrices, streamed in chunks of ``chunk`` rows (default: all at once)."""
    acc = CKAAccumulator([X.shape[1], Y.shape[1]])
    step = chunk or len(X)
    for start in range(0, len(X), step):
        acc.add([X[start:start + step], Y[start:start + step]])
    return acc.cka(0, 1, debiased)
