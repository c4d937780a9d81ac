"""k-nearest-neighbour classification on L2-normalised features with DINO's temperature-weighted votes.

Each of the ``k`` nearest training features (cosine similarity ``s``) votes for
its class with weight ``exp(s / T)``, ``T = 0.07`` (as in DINO's ``eval_knn``).
Neighbours come from faiss (an exact inner-product index; on GPU when faiss
has GPU support and the device is CUDA) when it is importable, else from a
chunked torch matmul + top-k. A bank too large for memory is given in row
chunks: each chunk's top k is merged into a running top k per query.
``k`` is chosen on the validation split, then the bank is train+val for the test split.
"""

from __future__ import annotations

import numpy as np
import torch

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
_CHUNK_ELEMENTS = 1 << 26


def backend_name(device: torch.device) -> str:
    """``faiss-gpu``, ``faiss-cpu`` or ``torch``: which nearest-neighbour search :func:`nearest` uses."""
    try:
        import faiss
    except ImportError:
        return "torch"
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    return "faiss-cpu"


def nearest(bank: np.ndarray, queries: np.ndarray, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and indices ``(m, k)`` of each query's ``k`` highest inner products in ``bank``."""
    backend = backend_name(device)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if backend.startswith("faiss"):
        import faiss

        index = faiss.IndexFlatIP(bank.shape[1])
        if backend == "faiss-gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(bank)
        sims, idx = index.search(queries, k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    bank_t = torch.from_numpy(bank).to(device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(bank)))
    sims, idx = [], []
    for lo in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[lo : lo + chunk]).to(device)
        top = (q @ bank_t.T).topk(k, dim=1)
        sims.append(top.values.cpu())
        idx.append(top.indices.cpu())
    return torch.cat(sims), torch.cat(idx)


def vote_scores(sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, num_classes: int,
                temperature: float = TEMPERATURE) -> torch.Tensor:
    """Class scores ``(m, C)``: the first ``k`` neighbours vote with weight ``exp(sim / T)``."""
    weights = (sims[:, :k].double() / temperature).exp()
    scores = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_scores(bank, bank_labels: np.ndarray, queries, ks, num_classes: int,
               device: torch.device) -> dict[int, torch.Tensor]:
    """``{k: scores (m, C)}`` for every k in ``ks`` from one neighbour search (features L2-normalised here).

    ``bank`` is an array ``(n, d)``, or a function that yields it in row chunks (read once per chunk of
    queries); ``queries`` an array or an iterable of row chunks. Chunked or not, the neighbours are the same.
    """
    bank_chunks = (lambda: iter([bank])) if isinstance(bank, np.ndarray) else bank
    query_chunks = [queries] if isinstance(queries, np.ndarray) else queries
    labels = torch.from_numpy(np.asarray(bank_labels, dtype=np.int64))
    scores: dict[int, list] = {k: [] for k in ks}
    for chunk in query_chunks:
        sims, idx = _nearest_over_chunks(bank_chunks(), normalize(chunk), max(ks), device)
        for k in ks:
            scores[k].append(vote_scores(sims, labels[idx], k, num_classes))
    return {k: torch.cat(parts) for k, parts in scores.items()}


def _nearest_over_chunks(bank_chunks, queries: np.ndarray, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` over a bank given in row chunks: each chunk's top k, merged into the running top k."""
    best, offset = None, 0
    for chunk in bank_chunks:
        sims, idx = nearest(normalize(chunk), queries, min(k, len(chunk)), device)
        idx, offset = idx + offset, offset + len(chunk)
        if best is not None:
            sims, idx = torch.cat([best[0], sims], 1), torch.cat([best[1], idx], 1)
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            sims, idx = top.values, idx.gather(1, top.indices)
        best = (sims, idx)
    return best


def capped_ks(bank_size: int) -> list[int]:
    """The k grid, capped at the bank size."""
    return sorted({min(k, bank_size) for k in KS})
