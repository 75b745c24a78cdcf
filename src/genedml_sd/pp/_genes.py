"""Gene selection and expression normalisation, computed on training data only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

TARGET_SUM = 1e4
"""Counts per spot after library-size normalisation (before ``log1p``)."""


def log_normalize(counts, target_sum: float = TARGET_SUM) -> np.ndarray:
    """Per-spot library-size normalisation followed by ``log1p``.

    Parameters
    ----------
    counts
        Raw counts (n_spots, n_genes), dense or sparse. The library size is the sum over the
        columns given, so pass all genes of the table, then subset.
    target_sum
        Each spot is scaled to this total before ``log1p``.

    Returns
    -------
    float32 array (n_spots, n_genes). Spots with zero counts stay zero.
    """
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("Counts contain NaN or infinite values.")
    lib = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale).astype(np.float32)


def normalized_expression(table: AnnData, genes: Sequence[str], *, table_key: str = "table") -> np.ndarray:
    """Log-normalised expression of ``genes`` (library size over all genes of ``table``).

    Raises a ``KeyError`` listing the genes absent from the table.
    """
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(genes)} genes are absent from table {table_key!r}, e.g. {missing[:10]}."
        )
    x = table.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if not np.isfinite(np.asarray(data, dtype=np.float64)).all():
        raise ValueError(f"Table {table_key!r} has NaN or infinite counts in X.")
    full = log_normalize(x)
    return full[:, table.var_names.get_indexer(list(genes))]


def select_genes(
    tables: Sequence[AnnData],
    n_top: int = 250,
    *,
    min_detection: float = 0.1,
) -> list[str]:
    """The ``n_top`` most variable genes among those detected in at least ``min_detection`` of spots.

    Computed over the spots of all ``tables`` together (training data only), on genes present in
    every table. Variability is the variance of the log-normalised expression (library size
    normalised to :data:`TARGET_SUM`, then ``log1p``), so well-measured variable genes rank first.

    Parameters
    ----------
    tables
        Raw-count tables of the training sections.
    n_top
        Number of genes (250 in the paper).
    min_detection
        Minimal fraction of spots with a non-zero count.

    Returns
    -------
    Gene names, most variable first.
    """
    if not tables:
        raise ValueError("select_genes needs at least one table.")
    shared = tables[0].var_names
    for t in tables[1:]:
        shared = shared.intersection(t.var_names, sort=False)
    if len(shared) == 0:
        raise ValueError("The training tables share no gene names.")
    expr = np.concatenate([log_normalize(t.X)[:, t.var_names.get_indexer(shared)] for t in tables])
    keep = (expr > 0).mean(axis=0) >= min_detection
    if keep.sum() < n_top:
        raise ValueError(
            f"Only {int(keep.sum())} genes are detected in >= {min_detection:.0%} of the training spots; "
            f"fewer than the {n_top} requested. Lower n_top or min_detection."
        )
    variance = pd.Series(expr[:, keep].var(axis=0, ddof=1), index=shared[keep])
    return variance.sort_values(ascending=False, kind="stable").index.astype(str).tolist()[:n_top]
