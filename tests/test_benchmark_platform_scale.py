"""Smoke test of the platform-scale benchmark's Visium HD layout writer and its shared helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
        import platform_scale

        yield platform_scale, _common
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_reflect_indices_mirror_at_both_ends(bench):
    _, common = bench
    assert common.reflect_indices(-3, 12, 0, 4).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]
    assert common.reflect_indices(5, 3, 5, 10).tolist() == [5, 6, 7]  # inside the region: unchanged


def test_sparse_umi_counts_follow_profile_and_library(bench):
    _, common = bench
    cdf = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.5, 0.5, 1.0]])  # gene 0 / gene 2 / half-half
    library = np.array([7, 0, 4, 3000, 5])
    x = common.sparse_umi_counts(library, np.array([0, 1, 1, 2, 0]), cdf, np.random.default_rng(0), chunk=2)
    assert x.dtype == np.int32 and x.has_sorted_indices
    dense = x.toarray()
    assert dense.sum(axis=1).tolist() == library.tolist()
    assert dense[[0, 4]].tolist() == [[7, 0, 0], [5, 0, 0]]
    assert dense[[1, 2]].tolist() == [[0, 0, 0], [0, 0, 4]]
    assert dense[3, 1] == 0 and abs(dense[3, 0] - 1500) < 150


def test_simulated_counts_follow_the_stain(bench):
    ps, _ = bench
    od = np.full((40, 40), 0.4)
    od[:, 20:] = 1.2  # right half darker
    profile = np.full(50, 1 / 50)
    x, stats, loadings = ps.simulate_counts(od, profile, 200.0, np.random.default_rng(1))
    assert x.shape == (1600, 50) and stats["tissue_fraction"] == 1.0
    cols = np.arange(1600) % 40
    share = np.asarray(x.sum(axis=1)).ravel()
    frac = np.asarray(x[:, loadings > 0].sum(axis=1)).ravel() / share
    assert frac[cols >= 25].mean() > frac[cols < 15].mean() + 0.1  # positive-loading genes rise with the stain


def test_layout_reads_back_with_gd_io_visium_hd(bench, her2st_root, tmp_path):
    import tifffile

    import genedml_sd as gd

    ps, _ = bench
    written = ps.write_layout(tmp_path, 390, root=her2st_root, section="B4", n_genes=60, umis=50.0, seed=0)
    assert written["n_bins"] == 400 and written["side_bins"] == 20 and not written["mirrored"]
    sdata = gd.io.visium_hd(tmp_path / "outs", bin_size=8, fullres_image_file=tmp_path / "microscope.tif")
    table = sdata.tables["table"]
    assert table.n_obs == 400 and table.n_vars == 60
    assert table.X.nnz == written["nnz"] and int(table.X.sum()) == written["total_umis"]
    um = gd.io.get_pixel_size(sdata, "platform_hd_he")
    assert um == pytest.approx(0.6878)
    # bin (row 3, col 7): centre at margin + (7.5, 3.5) x 8 µm in the microscope image
    row = np.flatnonzero(table.obs["barcode"].to_numpy() == "s_008um_00003_00007-1")[0]
    xy_um = table.obsm["spatial"][row] * um
    np.testing.assert_allclose(xy_um, [ps.MARGIN_UM + 7.5 * 8, ps.MARGIN_UM + 3.5 * 8], atol=1e-6)
    # the microscope image is the real section's pixels at the recorded crop origin
    src = ps.load_section(her2st_root, "B4")["rgb"]
    x0, y0 = written["crop_origin_px"]
    image = tifffile.imread(tmp_path / "microscope.tif")
    assert image.shape[:2] == tuple(written["image_px"])
    np.testing.assert_array_equal(image[:5, :5], src[y0 : y0 + 5, x0 : x0 + 5])
    # 16 µm aggregation: 10 x 10 pseudo-spots of 2 x 2 bins
    bins_key = next(k for k in sdata.shapes if k.endswith("square_008um"))
    gd.pp.aggregate_bins(sdata, bins_key, size_um=16)
    agg = sdata.tables[f"{bins_key}_16um_table"]
    assert agg.n_obs == 100 and (agg.obs["n_bins"] == 4).all()
