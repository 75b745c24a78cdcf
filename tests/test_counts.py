"""Raw-count checks, ``layer=``, input validation and sparse (never densified) gene selection in ``gd.pp``."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import genedml_sd as gd

FORMATS = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}


def _table(x, genes=None, **layers):
    t = AnnData(X=x)
    t.var_names = genes or [f"g{i}" for i in range(x.shape[1])]
    for k, v in layers.items():
        t.layers[k] = v
    return t


def _counts(n_obs, n_genes, seed=0):
    """Poisson counts with gene-specific rates (some genes rarely detected) and spot-specific depths."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.5, 2.0, n_genes)[None, :] * rng.uniform(0.3, 3.0, n_obs)[:, None]
    return rng.poisson(rate).astype(np.int64)


def _dense_log(x):
    """log1p(counts * 1e4 / library size) in dense float64, rounded to float32 (the definition)."""
    x = np.asarray(x, dtype=np.float64)
    lib = x.sum(axis=1, keepdims=True)
    return np.log1p(x * np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)).astype(np.float32)


def _dense_select(xs, names, n_top, min_detection=0.1):
    """Gene selection by a direct dense numpy computation on the concatenated expression."""
    shared = pd.Index(names[0])
    for nm in names[1:]:
        shared = shared.intersection(pd.Index(nm), sort=False)
    expr = np.concatenate([_dense_log(x)[:, pd.Index(nm).get_indexer(shared)] for x, nm in zip(xs, names, strict=True)])
    keep = (expr > 0).mean(axis=0) >= min_detection
    var = pd.Series(expr[:, keep].var(axis=0, ddof=1), index=shared[keep])
    return var.sort_values(ascending=False, kind="stable").index.tolist()[:n_top]


# ---------------------------------------------------------------------------------------------- 1. raw counts
@pytest.mark.filterwarnings("ignore:select_genes got only")
@pytest.mark.parametrize("fmt", FORMATS)
def test_log_normalised_counts_are_refused_with_what_was_found(fmt):
    raw = np.array([[1, 0, 3], [0, 2, 5], [4, 4, 0]])
    t = _table(FORMATS[fmt](np.log1p(raw)), counts=sp.csr_matrix(raw))
    with pytest.raises(ValueError, match=r"non-integer values such as 0\.6931 \(max 1\.792; looks log-normalised\)"):
        gd.pp.check_raw_counts(t, table_key="tab", slide="B4")
    with pytest.raises(ValueError) as err:
        gd.pp.normalized_expression(t, ["g0"], table_key="tab", slide="B4")
    msg = str(err.value)
    assert "table 'tab' of slide 'B4'" in msg and "layer='counts'" in msg and "table.X = table.layers['counts']" in msg
    with pytest.raises(ValueError, match="looks log-normalised"):
        gd.pp.select_genes([t], 1, min_detection=0)
    # the raw counts in the layer pass, and give the values of the raw counts in X
    gd.pp.check_raw_counts(t, layer="counts")
    np.testing.assert_array_equal(
        gd.pp.normalized_expression(t, ["g2", "g0"], layer="counts"), _dense_log(raw)[:, [2, 0]]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_counts_are_refused(fmt):
    t = _table(FORMATS[fmt](np.array([[1.0, -3, 2], [0, 2, 1]])))
    with pytest.raises(ValueError, match=r"table 'table' \(X\) are not raw counts: found negative values \(min -3;"):
        gd.pp.check_raw_counts(t)
    with pytest.raises(ValueError, match="negative values"):
        gd.pp.normalized_expression(t, ["g0"])
    t.X = t.X * 0.5  # negative and non-integer
    with pytest.raises(ValueError, match=r"negative values \(min -1\.5.* and 3 non-integer values such as 0\.5"):
        gd.pp.check_raw_counts(t)


def test_normalised_counts_with_large_values_and_message_without_layers():
    t = _table(sp.csr_matrix(np.array([[2500.5, 7499.5], [10000.0, 0]])))
    with pytest.raises(ValueError, match=r"looks normalised\).*layer='counts'.*layers of this table: \[\]"):
        gd.pp.check_raw_counts(t)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.float32, np.float64])
def test_raw_counts_of_any_storage_pass(fmt, dtype):
    t = _table(FORMATS[fmt](_counts(30, 8).astype(dtype)))
    gd.pp.check_raw_counts(t)


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_scans_every_chunk(fmt, monkeypatch):
    """Chunks of 7 values: a single bad value in the last chunk is still found (no sampling)."""
    monkeypatch.setattr("genedml_sd.pp._counts.CHUNK", 7)
    x = _counts(40, 9, seed=1).astype(np.float64) + 1
    x[-1, -1] = 2.25
    t = _table(FORMATS[fmt](x))
    with pytest.raises(ValueError, match=r"1 non-integer values such as 2\.25"):
        gd.pp.check_raw_counts(t)
    x[-1, -1] = -7
    t = _table(FORMATS[fmt](x))
    with pytest.raises(ValueError, match=r"min -7"):
        gd.pp.check_raw_counts(t)


def test_duplicated_sparse_entries_are_summed_without_touching_the_table():
    # entries (0, 0) stored twice as 0.5 + 0.5 = 1: raw counts once summed, as toarray() shows
    x = sp.csr_matrix((np.array([0.5, 0.5, 2.0]), np.array([0, 0, 1]), np.array([0, 3, 3])), shape=(2, 2))
    t = _table(x)
    gd.pp.check_raw_counts(t)
    np.testing.assert_array_equal(gd.pp.normalized_expression(t, ["g0", "g1"]), _dense_log(x.toarray()))
    assert len(t.X.data) == 3 and list(t.X.data) == [0.5, 0.5, 2.0]


# ---------------------------------------------------------------------------------------------- 2. layer=
def test_layer_is_read_and_missing_layer_lists_available_ones():
    raw = _counts(60, 12)
    tables = [_table(sp.csr_matrix(np.log1p(r)), counts=sp.csr_matrix(r)) for r in (raw[:30], raw[30:])]
    plain = [_table(sp.csr_matrix(r)) for r in (raw[:30], raw[30:])]
    assert gd.pp.select_genes(tables, 5, layer="counts") == gd.pp.select_genes(plain, 5)
    np.testing.assert_array_equal(
        gd.pp.normalized_expression(tables[0], ["g3", "g1"], layer="counts"),
        gd.pp.normalized_expression(plain[0], ["g3", "g1"]),
    )
    rows = np.arange(0, 30, 2)  # views, as tl passes them
    np.testing.assert_array_equal(
        gd.pp.normalized_expression(tables[0][rows], ["g3", "g1"], layer="counts"),
        _dense_log(raw[:30][rows])[:, [3, 1]],
    )
    logged = tables[0].copy()
    logged.layers["log"] = logged.X.copy()
    with pytest.raises(ValueError, match=r"layers\['log'\]\) are not raw counts.*layer='counts' for"):
        gd.pp.normalized_expression(logged, ["g1"], layer="log")
    with pytest.raises(KeyError, match=r"Layer 'raw' is not in table 'tab' of slide 'C2'; its layers are \['counts'\]"):
        gd.pp.normalized_expression(tables[0], ["g1"], layer="raw", table_key="tab", slide="C2")
    with pytest.raises(KeyError, match=r"Layer 'counts' is not in table 't2'; its layers are \[\]"):
        gd.pp.select_genes([tables[0], plain[1]], 5, layer="counts", table_keys=["t1", "t2"])
    with pytest.raises(KeyError, match=r"its layers are \[\] \(none\)"):
        gd.pp.check_raw_counts(plain[0], layer="counts")


# ---------------------------------------------------------------------------------------------- 3. NaN / inf
@pytest.mark.filterwarnings("ignore:select_genes got only")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_counts_name_slide_and_table(bad, fmt):
    x = np.array([[1.0, 2], [3, 4]])
    x[1, 0] = bad
    t = _table(FORMATS[fmt](x))
    with pytest.raises(ValueError, match=r"table 'tab' of slide 'B4' \(X\) have 1 NaN or infinite values"):
        gd.pp.normalized_expression(t, ["g0"], table_key="tab", slide="B4")
    ok = _table(sp.csr_matrix(np.array([[1, 2], [3, 4]])))
    with pytest.raises(ValueError, match=r"table 'C3_table' of slide 'C3' \(X\) have 1 NaN"):
        gd.pp.select_genes([ok, t], 1, min_detection=0, table_keys=["C2_table", "C3_table"], slides=["C2", "C3"])


# ---------------------------------------------------------------------------------------------- 4. n_top
@pytest.mark.parametrize("n", [-1, 0, -250, True, 2.5, "10"])
def test_n_top_must_be_a_positive_int(n):
    t = _table(sp.csr_matrix(_counts(40, 12)))
    with pytest.raises(ValueError, match=rf"must be a positive int, got {n!r}".replace(".", r"\.")):
        gd.pp.select_genes([t], n)


def test_more_genes_than_detected_is_an_error_never_a_silent_truncation():
    t = _table(sp.csr_matrix(_counts(40, 12)))
    n_ok = len(gd.pp.select_genes([t], 12, min_detection=0))
    assert n_ok == 12
    with pytest.raises(
        ValueError, match=r"Only 12 of the 12 genes shared by the 1 table\(s\).*fewer than the 13 requested"
    ):
        gd.pp.select_genes([t], 13, min_detection=0)
    assert len(gd.pp.select_genes([t], np.int64(3))) == 3
    with pytest.raises(ValueError, match=r"min_detection must be a fraction of spots in \[0, 1\], got 10"):
        gd.pp.select_genes([t], 3, min_detection=10)


# ---------------------------------------------------------------------------------------------- 5. few spots
def test_few_spots_warn_and_one_spot_is_an_error():
    x = _counts(12, 6)
    with pytest.warns(UserWarning, match=r"only 7 spots in 2 table\(s\)"):
        gd.pp.select_genes([_table(sp.csr_matrix(x[:3])), _table(sp.csr_matrix(x[3:7]))], 2, min_detection=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gd.pp.select_genes([_table(sp.csr_matrix(x[:10]))], 2, min_detection=0)
    with pytest.raises(ValueError, match="at least 2 spots.*have 1"):
        gd.pp.select_genes([_table(sp.csr_matrix(x[:1]))], 1, min_detection=0)


# ---------------------------------------------------------------------------------------------- 6. duplicates
def test_duplicated_gene_names_are_a_clear_error():
    t = _table(sp.csr_matrix(_counts(20, 4)), genes=["A", "B", "A", "C"])
    with pytest.raises(
        ValueError, match=r"Table 'tab' of slide 'B4' has 1 duplicated gene names.*\['A'\].*var_names_make_unique\(\)"
    ):
        gd.pp.normalized_expression(t, ["B"], table_key="tab", slide="B4")
    with pytest.raises(ValueError, match=r"Table 'table' has 1 duplicated gene names.*\['A'\]"):
        gd.pp.select_genes([t], 2)
    t.var_names_make_unique()
    assert len(gd.pp.select_genes([t], 2, min_detection=0)) == 2


# ---------------------------------------------------------------------------------------------- 7. sparse = dense
@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_selection_and_expression_equal_the_dense_computation(fmt, monkeypatch):
    """Small chunks and blocks (many of each) give exactly the dense definition, for every storage."""
    monkeypatch.setattr("genedml_sd.pp._counts.CHUNK", 257)
    monkeypatch.setattr("genedml_sd.pp._genes.CHUNK", 257)
    xs = [_counts(300, 400, seed=1), _counts(250, 400, seed=2), _counts(200, 390, seed=3)]
    xs[1][5] = 0  # an empty spot
    perm = np.random.default_rng(4).permutation(400)[:390]
    names = [[f"g{i}" for i in range(400)], [f"g{i}" for i in range(399, -1, -1)], [f"g{i}" for i in perm]]
    tables = [_table(FORMATS[fmt](x), genes=nm) for x, nm in zip(xs, names, strict=True)]
    expected = _dense_select(xs, names, 200)
    assert gd.pp.select_genes(tables, 200) == expected
    got = gd.pp.normalized_expression(tables[1], expected)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _dense_log(xs[1])[:, pd.Index(names[1]).get_indexer(expected)])
    np.testing.assert_array_equal(gd.pp.log_normalize(tables[0].X), _dense_log(xs[0]))


def test_demo_selection_equals_the_dense_computation(demo):
    tables = [s.tables["table"] for s in demo]
    xs = [t.X.toarray() for t in tables]
    names = [list(t.var_names) for t in tables]
    assert gd.pp.select_genes(tables, 250) == _dense_select(xs, names, 250)
    assert gd.pp.select_genes(tables[1:], 1000, min_detection=0.05) == _dense_select(xs[1:], names[1:], 1000, 0.05)


def test_large_sparse_table_is_never_densified(monkeypatch):
    """20,000 spots x 5,000 genes at 1 % density: peak memory far below the dense size, no full toarray()."""
    n_obs, n_genes = 20_000, 5_000
    rng = np.random.default_rng(0)
    x = sp.random(
        n_obs, n_genes, density=0.01, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 20, k)
    )
    x = x.astype(np.int32)
    t = _table(x)
    densified = []
    for cls in (sp.csr_matrix, sp.csc_matrix):
        original = cls.toarray

        def spy(self, *args, _original=original, **kwargs):
            densified.append(self.shape)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "toarray", spy)
    dense_mb = n_obs * n_genes * 8 / 1e6  # the float64 copy made before (800 MB)
    tracemalloc.start()
    try:
        genes = gd.pp.select_genes([t], 250, min_detection=0.005)
        _, peak_select = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        expr = gd.pp.normalized_expression(t, genes)
        _, peak_expr = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        gd.pp.check_raw_counts(t)
        _, peak_check = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak MB: select {peak_select / 1e6:.1f}, expression {peak_expr / 1e6:.1f}, check {peak_check / 1e6:.1f}")
    assert (n_obs, n_genes) not in densified
    assert expr.shape == (n_obs, 250)
    assert peak_select / 1e6 < dense_mb / 8, peak_select / 1e6
    assert peak_expr / 1e6 < dense_mb / 16, peak_expr / 1e6  # the float32 result alone is 20 MB
    assert peak_check / 1e6 < 60, peak_check / 1e6
    # the values of a few genes against the dense definition computed on their columns only
    lib = np.asarray(x.sum(axis=1), dtype=np.float64)
    cols = t.var_names.get_indexer(genes[:20])
    ref = np.log1p(x[:, cols].toarray().astype(np.float64) * (1e4 / lib)).astype(np.float32)
    np.testing.assert_array_equal(expr[:, :20], ref)


def test_tables_are_not_modified():
    raw = _counts(50, 10)
    x = sp.csr_matrix(raw)
    t = _table(x, counts=sp.csc_matrix(raw))
    data, layer_data = t.X.data.copy(), t.layers["counts"].data.copy()
    gd.pp.select_genes([t], 3)
    gd.pp.select_genes([t], 3, layer="counts")
    gd.pp.normalized_expression(t, ["g1"], layer="counts")
    gd.pp.log_normalize(t.X)
    assert t.X is x and np.array_equal(t.X.data, data) and np.array_equal(t.layers["counts"].data, layer_data)
    assert t.X.dtype == np.int64
