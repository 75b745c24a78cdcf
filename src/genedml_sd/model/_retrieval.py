"""Prediction by retrieval: a query's expression is the mean expression of its most similar reference spots.

Shared by BLEEP and Gene-DML's ``predictor="retrieval"``; only torch is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._base import targets
from ._data import SlideTensors
from ._losses import mean_gene_pcc

#: The predictors ``predictor="auto"`` chooses among, in order of preference on a tie.
AUTO_CANDIDATES = ("head", "retrieval", "blend")
#: Validation PCCs closer than this count as a tie in :func:`choose_predictor`.
TIE = 1e-6


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


@torch.no_grad()
def choose_predictor(module: Any, val: Sequence[SlideTensors], batch_size: int = 1024) -> dict[str, Any]:
    """Set a Gene-DML module's ``config.predictor`` to the best of :data:`AUTO_CANDIDATES` on validation slides.

    Each candidate predicts every validation slide whole with the module's current (best-epoch) weights
    and retrieval bank (the blend as the mean of the head's and the retrieval's predictions); its score is the mean over slides of the mean per-gene PCC (as logged as
    ``val/pcc``). The highest score wins; a tie (within :data:`TIE`) keeps the earlier candidate, and
    every score NaN keeps the head, as does training without validation slides or without the instance
    loss. Only training data enters the choice: the validation slides are held out of the training
    slides, never a test section.

    Returns
    -------
    ``{"predictor": chosen, "scores": {candidate: score or None}, "source": ...}``, for the training record.
    """
    fallback = "no instance loss (no gene-aligned space)" if not module.config.instance_loss else None
    if fallback is None and not val:
        fallback = "no validation slides"
    if fallback is not None:
        module.config = module.config.replace(predictor="head")
        return {"predictor": "head", "scores": {}, "source": f"{fallback}: the head"}
    per_slide: dict[str, list[float]] = {name: [] for name in AUTO_CANDIDATES}
    for s in val:  # the blend is the mean of the other two: two passes over each slide, not three
        preds = {}
        for name in ("head", "retrieval"):
            module.config = module.config.replace(predictor=name)
            preds[name] = module.predict_slide(s.local, s.coords, s.neighbour, batch_size=batch_size).float()
        preds["blend"] = (preds["head"] + preds["retrieval"]) / 2
        target = targets(s).to(preds["head"].device)
        for name in AUTO_CANDIDATES:
            per_slide[name].append(float(mean_gene_pcc(preds[name], target)))
    scores: dict[str, float | None] = {}
    for name, values in per_slide.items():
        finite = [x for x in values if math.isfinite(x)]
        scores[name] = sum(finite) / len(finite) if finite else None
    value = {n: -math.inf if v is None else v for n, v in scores.items()}
    top = max(value.values())
    best = next((n for n in AUTO_CANDIDATES if top > -math.inf and value[n] >= top - TIE), "head")
    module.config = module.config.replace(predictor=best)
    return {"predictor": best, "scores": scores, "source": f"validation sections ({len(val)})"}
