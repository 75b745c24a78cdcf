"""Per-gene metrics between predicted and observed expression."""

from __future__ import annotations

import numpy as np
import pandas as pd


def per_gene_pearson(pred: np.ndarray, obs: np.ndarray, genes: list[str]) -> pd.DataFrame:
    """Pearson r of each gene across spots, with MSE and MAE.

    Parameters
    ----------
    pred, obs
        Predicted and observed log-normalised expression, (n_spots, n_genes).
    genes
        Gene names, n_genes.

    Returns
    -------
    DataFrame indexed by gene with ``pcc`` (NaN where either side is constant), ``mse``, ``mae``,
    ``constant`` (observed expression constant over the spots) and ``n_spots``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if pred.shape != obs.shape:
        raise ValueError(f"Predictions {pred.shape} and observations {obs.shape} differ in shape.")
    pc = pred - pred.mean(axis=0)
    oc = obs - obs.mean(axis=0)
    denom = np.sqrt((pc**2).sum(axis=0) * (oc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (pc * oc).sum(axis=0) / denom, np.nan)
    return pd.DataFrame(
        {
            "pcc": r,
            "mse": ((pred - obs) ** 2).mean(axis=0),
            "mae": np.abs(pred - obs).mean(axis=0),
            "constant": np.ptp(obs, axis=0) == 0,
            "n_spots": obs.shape[0],
        },
        index=pd.Index(genes, name="gene"),
    )
