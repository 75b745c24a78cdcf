"""Prediction by retrieval: a query's expression is the mean expression of its most similar reference spots.

Shared by BLEEP and Gene-DML's ``predictor="retrieval"``; only torch is imported here.
"""

from __future__ import annotations

import torch


def topk_mean_expression(sims: torch.Tensor, ref_expr: torch.Tensor, k: int, tau: float | None = None) -> torch.Tensor:
    """Expression (B, G) of B queries from their similarities to R reference spots.

    Parameters
    ----------
    sims
        Similarities (B, R) of the queries to the reference spots (e.g. cosine).
    ref_expr
        Expression of the reference spots (R, G).
    k
        Number of most similar reference spots averaged per query (``min(k, R)``).
    tau
        ``None``: plain mean of the ``k`` retrieved spots; a temperature: weights ``softmax(sims / tau)``
        over them.

    Returns
    -------
    float32 (B, G).
    """
    if sims.shape[1] == 0:
        raise RuntimeError("The reference bank is empty; train the model first.")
    with torch.autocast(device_type=sims.device.type, enabled=False):
        top, idx = sims.float().topk(min(int(k), sims.shape[1]), dim=1)
        neighbours = ref_expr.float()[idx]  # (B, k, G)
        if tau is None:
            return neighbours.mean(dim=1)
        w = torch.softmax(top / tau, dim=1)
        return (w.unsqueeze(-1) * neighbours).sum(dim=1)


def reference_rows(n_spots: int, n_reference: int) -> torch.Tensor:
    """Which of ``n_spots`` training spots form a reference bank of ``n_reference``: all, or a seeded sample.

    Returns sorted int64 row indices (n_reference,) into the training spots concatenated in slide order.
    """
    if n_reference >= n_spots:
        return torch.arange(n_spots)
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n_spots, generator=g)[:n_reference].sort().values
