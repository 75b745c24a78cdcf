from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import genedml_sd as gd


def test_log_normalize_by_hand():
    counts = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]])
    got = gd.pp.log_normalize(sp.csr_matrix(counts), target_sum=100)
    expected = np.log1p(np.array([[25, 75, 0], [0, 0, 0], [25, 25, 50]], dtype=float))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_normalized_expression_uses_library_of_all_genes_and_names_missing_genes():
    t = AnnData(X=sp.csr_matrix(np.array([[1, 3], [2, 2]])))
    t.var_names = ["A", "B"]
    np.testing.assert_allclose(gd.pp.normalized_expression(t, ["B"]).ravel(), np.log1p([7500.0, 5000.0]), rtol=1e-6)
    with pytest.raises(KeyError, match=r"1 of 2 genes are absent from table 'table', e.g. \['ZZZ'\]"):
        gd.pp.normalized_expression(t, ["A", "ZZZ"])
    t.X = np.array([[1.0, np.nan], [2, 2]])
    with pytest.raises(ValueError, match="NaN"):
        gd.pp.normalized_expression(t, ["A"])


def test_select_genes_ranks_by_variance_among_detected_genes():
    rng = np.random.default_rng(0)
    n = 200
    base = rng.poisson(20, (n, 6))
    base[:, 0] = rng.choice([0, 200], n)  # very variable, detected in ~50 %
    base[:, 1] = np.where(np.arange(n) < 10, 500, 0)  # variable but detected in 5 % only
    base[:, 2] = 20  # constant
    tables = [AnnData(X=sp.csr_matrix(base[:100])), AnnData(X=sp.csr_matrix(base[100:]))]
    for t in tables:
        t.var_names = [f"g{i}" for i in range(6)]
    genes = gd.pp.select_genes(tables, n_top=3, min_detection=0.1)
    assert genes[0] == "g0" and "g1" not in genes and "g2" not in genes
    with pytest.raises(ValueError, match="fewer than the 10 requested"):
        gd.pp.select_genes(tables, n_top=10)


def test_select_genes_on_real_training_sections(demo):
    genes = gd.pp.select_genes([s.tables["table"] for s in demo[1:]], 250)
    assert len(genes) == 250 == len(set(genes))
    # immunoglobulin and secretoglobin genes vary strongly across breast-cancer tissue
    assert {"SCGB2A2", "IGKC"} & set(genes)


def test_import_is_fast_and_lazy():
    code = "import time,sys; t=time.time(); import genedml_sd; print(time.time()-t, 'torch' in sys.modules, 'spatialdata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 3.0
    assert out[1:] == ["False", "False"]


def test_log_normalize_can_stay_sparse():
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    x = sp.random(200, 50, density=0.1, random_state=1, format="csr", data_rvs=lambda n: rng.integers(1, 9, n))
    x = x.astype(np.int32)
    dense = gd.pp.log_normalize(x)
    for fmt in ("csr", "csc"):
        out = gd.pp.log_normalize(x.asformat(fmt), dense=False)
        assert sp.issparse(out) and out.format == "csr" and out.dtype == np.float32 and out.nnz == x.nnz
        np.testing.assert_array_equal(out.toarray(), dense)
    lib = np.asarray(x.sum(axis=1)).ravel()
    np.testing.assert_allclose(dense[0], np.log1p(x[0].toarray().ravel() * 1e4 / lib[0]), rtol=1e-6)
    assert isinstance(gd.pp.log_normalize(x.toarray(), dense=False), np.ndarray)  # dense in, dense out
