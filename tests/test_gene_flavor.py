"""select_genes(flavor=...): highly expressed genes against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import genedml_sd as gd


def _tables(sparse: bool, seed: int = 0) -> list[AnnData]:
    """Two tables of raw counts (120 + 80 spots x 40 genes) with distinct gene means; g07 is in 20 % of spots."""
    rng = np.random.default_rng(seed)
    n, g = 200, 40
    rates = np.geomspace(0.3, 60, g)
    rng.shuffle(rates)
    counts = rng.poisson(rates, (n, g)).astype(np.int64)
    counts[:, 7] = np.where(np.arange(n) % 5 == 0, 2000, 0)  # high where detected, detected in 20 % of spots
    names = [f"g{i:02d}" for i in range(g)]
    tables = []
    for part in (counts[:120], counts[120:]):
        t = AnnData(X=sp.csr_matrix(part) if sparse else part)
        t.var_names = names
        tables.append(t)
    return tables


def _direct(tables: list[AnnData], flavor: str, min_detection: float) -> list[str]:
    """Ranking from the dense float64 log-normalised expression of all spots together."""
    x = np.vstack([np.asarray(t.X.toarray() if sp.issparse(t.X) else t.X, dtype=np.float64) for t in tables])
    lib = x.sum(axis=1, keepdims=True)
    expr = np.log1p(x / lib * gd.pp.TARGET_SUM)
    keep = (x > 0).mean(axis=0) >= min_detection
    score = expr.mean(axis=0) if flavor == "mean" else expr.var(axis=0, ddof=1)
    s = pd.Series(score[keep], index=np.asarray(tables[0].var_names)[keep])
    return s.sort_values(ascending=False, kind="stable").index.tolist()


def test_target_sum_is_the_one_of_the_direct_computation():
    assert gd.pp.TARGET_SUM == 1e4


@pytest.mark.parametrize("sparse", [False, True])
def test_mean_flavor_equals_direct_numpy_ranking(sparse):
    tables = _tables(sparse)
    got = gd.pp.select_genes(tables, n_top=25, min_detection=0.1, flavor="mean")
    expected = _direct(tables, "mean", 0.1)
    assert got == expected[:25]
    # mean and variance rankings differ on these data (the test would see a swapped flavour)
    assert got[:10] != gd.pp.select_genes(tables, n_top=10, min_detection=0.1)


@pytest.mark.parametrize("sparse", [False, True])
def test_mean_flavor_applies_min_detection(sparse):
    tables = _tables(sparse)
    detection = (np.vstack([np.asarray(t.X.todense() if sp.issparse(t.X) else t.X) for t in tables]) > 0).mean(axis=0)
    assert detection[7] == 0.2 and np.sort(detection)[1] > 0.25  # only g07 is below 25 %
    full = gd.pp.select_genes(tables, n_top=40, min_detection=0.0, flavor="mean")
    assert full == _direct(tables, "mean", 0.0) and "g07" in full[:-5]  # g07 ranks above some detected genes
    filtered = gd.pp.select_genes(tables, n_top=39, min_detection=0.25, flavor="mean")
    assert filtered == [g for g in full if g != "g07"] == _direct(tables, "mean", 0.25)


def test_dense_and_sparse_counts_give_the_same_mean_ranking():
    dense = gd.pp.select_genes(_tables(False), n_top=30, min_detection=0.05, flavor="mean")
    sparse = gd.pp.select_genes(_tables(True), n_top=30, min_detection=0.05, flavor="mean")
    assert dense == sparse and len(dense) == 30


@pytest.mark.parametrize("sparse", [False, True])
def test_default_flavor_is_unchanged_variance(sparse):
    tables = _tables(sparse)
    default = gd.pp.select_genes(tables, n_top=20)
    assert default == gd.pp.select_genes(tables, n_top=20, flavor="variance")
    assert default == _direct(tables, "variance", 0.1)[:20]


def test_mean_flavor_counts_too_few_detected_genes():
    tables = _tables(True)
    n_detected = len(_direct(tables, "mean", 0.1))
    with pytest.raises(ValueError, match=f"Only {n_detected} of the 40 genes"):
        gd.pp.select_genes(tables, n_top=n_detected + 1, flavor="mean")


@pytest.mark.parametrize("bad", ["Mean", "seurat_v3", ""])
def test_unknown_flavor_raises_naming_value_and_choices(bad):
    with pytest.raises(ValueError, match=rf"flavor must be one of \('variance', 'mean'\), got {bad!r}"):
        gd.pp.select_genes(_tables(False), n_top=5, flavor=bad)
