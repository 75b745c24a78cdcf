"""Neighbour-mean reference: hand-made lattices, brute force, sparse input and the HER2ST demo."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import genedml_sd as gd
from genedml_sd.tl import neighbour_mean_expression, neighbour_reference
from genedml_sd.tl._reference import default_radius, neighbour_adjacency


def _square(n: int, pitch: float = 100.0) -> np.ndarray:
    """Centres of an n x n square lattice, row by row, (n * n, 2)."""
    ys, xs = np.mgrid[0:n, 0:n]
    return np.column_stack([xs.ravel(), ys.ravel()]).astype(float) * pitch


def _hex(n_rows: int, n_cols: int, pitch: float = 100.0) -> np.ndarray:
    """Centres of a hexagonal lattice (odd rows shifted by half a pitch), (n_rows * n_cols, 2)."""
    ys, xs = np.mgrid[0:n_rows, 0:n_cols].astype(float)
    xs = (xs + 0.5 * (ys % 2)) * pitch
    return np.column_stack([xs.ravel(), ys.ravel() * pitch * np.sqrt(3) / 2])


def _brute_force(coords: np.ndarray, expr: np.ndarray, radius: float) -> np.ndarray:
    out = np.full(expr.shape, np.nan)
    for i in range(len(coords)):
        d = np.sqrt(((coords - coords[i]) ** 2).sum(axis=1))
        nb = (d <= radius) & (np.arange(len(coords)) != i)
        if nb.any():
            out[i] = expr[nb].mean(axis=0)
    return out


def test_square_lattice_centre_has_8_neighbours_and_corner_3():
    coords = _square(3)
    expr = np.random.default_rng(0).normal(size=(9, 4))
    assert default_radius(coords) == pytest.approx(150.0)
    pred = neighbour_mean_expression(coords, expr)
    assert pred.shape == (9, 4) and pred.dtype == np.float64
    np.testing.assert_allclose(pred[4], expr[[0, 1, 2, 3, 5, 6, 7, 8]].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pred[0], expr[[1, 3, 4]].mean(axis=0), rtol=1e-12)  # corner: 2 edges + 1 diagonal
    np.testing.assert_allclose(pred[8], expr[[4, 5, 7]].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pred[1], expr[[0, 2, 3, 4, 5]].mean(axis=0), rtol=1e-12)  # edge: 5 neighbours
    # with a radius below the diagonal, only the 4 edge neighbours of the centre remain
    np.testing.assert_allclose(
        neighbour_mean_expression(coords, expr, radius=120)[4], expr[[1, 3, 5, 7]].mean(axis=0), rtol=1e-12
    )


def test_hex_lattice_interior_spot_has_6_neighbours():
    coords = _hex(5, 5)
    degree = np.diff(neighbour_adjacency(coords).indptr)
    interior = 2 * 5 + 2  # row 2, column 2
    assert degree[interior] == 6
    assert degree.max() == 6 and degree.min() >= 2
    expr = np.arange(len(coords), dtype=float)[:, None] ** 2
    d = np.linalg.norm(coords - coords[interior], axis=1)
    ring = np.flatnonzero((d > 0) & (d < 101))
    assert len(ring) == 6
    np.testing.assert_allclose(neighbour_mean_expression(coords, expr)[interior], expr[ring].mean(axis=0))


def test_adjacency_rows_sum_to_one_and_exclude_self():
    adjacency = neighbour_adjacency(_square(4))
    assert adjacency.diagonal().sum() == 0
    np.testing.assert_allclose(np.asarray(adjacency.sum(axis=1)).ravel(), 1.0)
    assert ((adjacency > 0) != (adjacency.T > 0)).nnz == 0


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_and_dense_expression_agree(fmt):
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1000, (300, 2))
    x = sp.random(300, 25, density=0.2, random_state=2, format=fmt, dtype=np.float32)
    dense = neighbour_mean_expression(coords, x.toarray())
    sparse = neighbour_mean_expression(coords, x)
    assert dense.dtype == sparse.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(dense), np.isnan(sparse))
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-7)


def test_equals_brute_force_on_random_points():
    rng = np.random.default_rng(2)
    coords = rng.uniform(0, 500, (200, 2))
    expr = rng.gamma(2.0, size=(200, 7))
    radius = default_radius(coords)
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    assert radius == pytest.approx(1.5 * np.median(dist.min(axis=1)))
    expected = _brute_force(coords, expr, radius)
    got = neighbour_mean_expression(coords, expr)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # an explicit radius as well
    np.testing.assert_allclose(
        neighbour_mean_expression(coords, expr, radius=60.0), _brute_force(coords, expr, 60.0), rtol=1e-12
    )


def test_isolated_spot_gets_nan_row():
    coords = np.vstack([_square(3), [[5000.0, 5000.0]]])
    expr = np.random.default_rng(3).normal(size=(10, 3))
    pred = neighbour_mean_expression(coords, expr)
    assert np.isnan(pred[9]).all() and np.isfinite(pred[:9]).all()
    np.testing.assert_allclose(pred[4], expr[[0, 1, 2, 3, 5, 6, 7, 8]].mean(axis=0))


def test_bad_inputs_raise():
    coords = _square(3)
    with pytest.raises(ValueError, match=r"n_obs=9"):
        neighbour_mean_expression(coords, np.zeros((8, 2)))
    with pytest.raises(ValueError, match=r"\(n_obs, 2\)"):
        neighbour_mean_expression(np.zeros((9, 3)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="radius must be a positive"):
        neighbour_mean_expression(coords, np.zeros((9, 2)), radius=0)
    with pytest.raises(ValueError, match="non-finite"):
        neighbour_mean_expression(np.where(coords == 0, np.nan, coords), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="median nearest-neighbour distance"):
        neighbour_mean_expression(np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="at least 2 observations"):
        neighbour_mean_expression(np.zeros((1, 2)), np.zeros((1, 2)))


# --------------------------------------------------------------------------------------------- SpatialData
@pytest.fixture(scope="module")
def b4_reference(demo):
    b4 = demo[0]
    genes = gd.pp.select_genes([b4.tables["table"]], 100)
    pred, obs = neighbour_reference(b4, genes)
    return b4, genes, pred, obs


def test_reference_on_her2st_demo_section(b4_reference):
    b4, genes, pred, obs = b4_reference
    n_spots = len(b4[_keys(b4).shapes_key])
    assert pred.shape == obs.shape == (n_spots, len(genes))
    assert pred.dtype == obs.dtype == np.float32 and np.isfinite(pred).all()
    np.testing.assert_allclose(obs, gd.tl._data.slide_expression(b4, _keys(b4), genes))
    pcc = gd.tl.per_gene_pearson(pred, obs, genes)["pcc"]
    mean_pcc = float(np.nanmean(pcc))
    print(f"\nHER2ST B4 neighbour-mean reference: mean per-gene PCC over {pcc.notna().sum()} genes = {mean_pcc:.4f}")
    assert 0.05 < mean_pcc < 0.9


def test_reference_matches_neighbour_mean_of_um_coordinates(b4_reference):
    b4, genes, pred, obs = b4_reference
    um = _centres_um(b4)
    np.testing.assert_allclose(pred, neighbour_mean_expression(um, obs), rtol=1e-6)
    # legacy ST spots lie on a 200 µm square lattice (centres measured per spot, so distances vary):
    # the default radius is about 1.5 x 200 µm and reaches the 4 edge and 4 diagonal neighbours
    radius = default_radius(um)
    assert 250 < radius < 320
    degree = np.diff(neighbour_adjacency(um).indptr)
    assert degree.max() == 8 and degree.min() >= 1 and degree.mean() > 4


def test_isolated_spots_are_filled_with_the_slide_mean(b4_reference):
    b4, genes, _, obs = b4_reference
    obs = obs[:, :5]
    # at 180 µm (below most centre distances) some spots have neighbours and most are isolated
    direct = neighbour_mean_expression(_centres_um(b4), obs, radius=180.0)
    isolated = np.isnan(direct).all(axis=1)
    assert 0 < isolated.sum() < len(isolated) and np.isfinite(direct[~isolated]).all()
    pred, obs_180 = neighbour_reference(b4, genes[:5], radius=180.0)
    np.testing.assert_array_equal(obs_180, obs)
    np.testing.assert_allclose(pred[~isolated], direct[~isolated], rtol=1e-6)
    np.testing.assert_allclose(pred[isolated], np.broadcast_to(obs.mean(axis=0), pred[isolated].shape), rtol=1e-6)
    # with no neighbour at all, every spot is predicted by the slide mean (PCC undefined, not NaN rows)
    pred_1, _ = neighbour_reference(b4, genes[:5], radius=1.0)
    assert np.isfinite(pred_1).all() and np.ptp(pred_1, axis=0).max() == 0


def _centres_um(sdata) -> np.ndarray:
    from genedml_sd._spatial import get_pixel_size, spots_to_pixels

    keys = _keys(sdata)
    return spots_to_pixels(sdata, keys.shapes_key, keys.image_key) * get_pixel_size(sdata, keys.image_key)


def _keys(sdata):
    return gd.tl._data.resolve_slide_keys(sdata, None, None, None, need_table=True)
