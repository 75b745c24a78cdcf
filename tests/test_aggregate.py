"""Summing bins (or cells) into square pseudo-spots: gd.pp.aggregate_bins and gd.pp.aggregate_values."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from genedml_sd._spatial import affine_to_pixels, get_pixel_size, set_pixel_size, spots_to_pixels

NX, NY, BIN_UM, UM_PER_PX, SCALE = 24, 20, 8.0, 2.0, 3.0  # synthetic bins: 24 x 20 bins of 8 µm at 2 µm/px


def _synthetic_bins(n_genes=30, seed=0, shuffle_table=False):
    """White image with Scale(3, 3) to global, 8 µm square bins over all of it, Poisson counts annotating them."""
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Scale

    import genedml_sd as gd

    h, w = int(NY * BIN_UM / UM_PER_PX), int(NX * BIN_UM / UM_PER_PX)
    el = Image2DModel.parse(
        np.full((3, h, w), 230, dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Scale([SCALE, SCALE], axes=("x", "y"))},
    )
    sdata = SpatialData(images={"im": el})
    set_pixel_size(sdata, "im", UM_PER_PX)
    gd.pp.spot_grid(sdata, "im", shape="square", size_um=BIN_UM, mask=None, key_added="bins")
    n = len(sdata["bins"])
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.4, size=(n, n_genes)).astype(np.int32)
    order = rng.permutation(n) if shuffle_table else np.arange(n)
    obs = pd.DataFrame({"region": pd.Categorical(["bins"] * n), "bin_id": order}, index=[f"b{i}" for i in order])
    table = ad.AnnData(
        X=sp.csr_matrix(dense[order]), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )
    table.uns["genedml_sd"] = {
        "patient": "P1",
        "section": "S1",
        "platform": "visium_hd",
        "observation": "bin",
        "observation_um": BIN_UM,
        "bin_size_um": BIN_UM,
        "image_key": "im",
        "shapes_key": "bins",
    }
    sdata.tables["table"] = TableModel.parse(table, region="bins", region_key="region", instance_key="bin_id")
    return sdata, dense


def _expected(dense, size_bins):
    """Direct numpy sums of bins (row-major, NX per row) into pseudo-spots of size_bins x size_bins bins."""
    rows, cols = np.divmod(np.arange(len(dense)), NX)
    pc, pr = cols // size_bins, rows // size_bins
    cells = sorted(set(zip(pr.tolist(), pc.tolist(), strict=True)))
    out = np.zeros((len(cells), dense.shape[1]), dtype=np.int64)
    n_bins = np.zeros(len(cells), dtype=np.int64)
    for k, (r, c) in enumerate(cells):
        sel = (pr == r) & (pc == c)
        out[k] = dense[sel].sum(axis=0)
        n_bins[k] = sel.sum()
    return np.array([(c, r) for r, c in cells]), out, n_bins


# ---------------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("shuffle_table", [False, True])
def test_aggregate_bins_equals_direct_sums(shuffle_table):
    import shapely

    from genedml_sd.pp import aggregate_bins

    sdata, dense = _synthetic_bins(shuffle_table=shuffle_table)
    aggregate_bins(sdata, "bins", size_um=56)
    shapes, table = sdata["bins_56um"], sdata.tables["bins_56um_table"]
    cells, expected, n_bins = _expected(dense, 7)
    assert len(shapes) == table.n_obs == 4 * 3  # 24 / 7 -> 4 columns, 20 / 7 -> 3 rows (partial at the edges)

    assert sp.issparse(table.X) and table.X.format == "csr" and table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), expected)
    assert int(table.X.sum()) == int(dense.sum())  # totals preserved
    np.testing.assert_array_equal(table.obs[["array_col", "array_row"]].to_numpy(), cells)
    np.testing.assert_array_equal(table.obs["n_bins"].to_numpy(), n_bins)
    assert n_bins.max() == 49 and n_bins.sum() == NX * NY

    # geometry: pseudo-spot (col, row) is [56 col, 56 col + 56) x [56 row, 56 row + 56) µm of the image frame
    coords = shapely.get_coordinates(shapes.geometry.to_numpy()).reshape(len(shapes), 5, 2)
    m = affine_to_pixels(sdata, "bins_56um", "im")
    um = (coords @ m[:2, :2].T + m[:2, 2]) * UM_PER_PX
    np.testing.assert_allclose(um.min(axis=1), 56.0 * cells, atol=1e-9)
    np.testing.assert_allclose(um.max(axis=1), 56.0 * cells + 56.0, atol=1e-9)
    np.testing.assert_allclose(coords.min(axis=1), 56.0 * cells / UM_PER_PX * SCALE, atol=1e-9)  # global units
    np.testing.assert_array_equal(shapes["side_um"].to_numpy(), 56.0)
    np.testing.assert_allclose(table.obsm["spatial"], (56.0 * cells + 28.0) / UM_PER_PX * SCALE, atol=1e-9)

    # the table annotates the squares, row i <-> shape i; sample metadata kept, geometry entries replaced
    assert table.uns["spatialdata_attrs"]["region"] == "bins_56um"
    np.testing.assert_array_equal(table.obs["bin_id"].to_numpy(), np.arange(len(shapes)))
    assert list(shapes.index) == list(range(len(shapes)))
    info = table.uns["genedml_sd"]
    assert info["patient"] == "P1" and info["section"] == "S1" and info["platform"] == "visium_hd"
    assert info["side_um"] == info["observation_um"] == 56.0 and info["observation"] == "spot"
    assert "bin_size_um" not in info and info["origin_um"] == [0.0, 0.0]
    assert info["aggregated_from"] == "bins" and info["aggregated_from_table"] == "table"
    assert info["shapes_key"] == "bins_56um" and info["image_key"] == "im"
    assert table.obs["section"].iloc[0] == "S1" and list(table.var_names) == list(sdata.tables["table"].var_names)


def test_aggregate_origin_and_other_sizes():
    from genedml_sd.pp import aggregate_bins

    sdata, dense = _synthetic_bins()
    # 16 µm = 2 x 2 bins; an origin shifted by one bin puts bin column 0 into pseudo-spot column -1
    shapes, table = aggregate_bins(sdata, "bins", size_um=16, origin_um=(8.0, 0.0), inplace=False)
    assert "bins_16um" not in sdata
    cols = table.obs["array_col"].to_numpy()
    assert cols.min() == -1 and cols.max() == 11
    first = (table.obs["array_col"] == -1) & (table.obs["array_row"] == 0)
    expected = dense[[0, NX]].sum(axis=0)  # bins (0, 0) and (0, 1)
    np.testing.assert_array_equal(table.X[np.flatnonzero(first)[0]].toarray()[0], expected)
    assert table.uns["genedml_sd"]["origin_um"] == [8.0, 0.0]


def test_observations_of_any_shape():
    """Circles (points + radius) and triangles are assigned by their centroid, like the squares."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    from genedml_sd.pp import aggregate_bins

    sdata, _ = _synthetic_bins()
    _, ref = aggregate_bins(sdata, "bins", size_um=56, origin_um=(0, 0), inplace=False)
    bins = sdata["bins"]
    centres_um = shapely.get_coordinates(bins.geometry.centroid.to_numpy()) / SCALE * UM_PER_PX

    # circles stored in µm, with a µm -> global Scale of their own
    to_global = Scale([SCALE / UM_PER_PX] * 2, axes=("x", "y"))
    circles = ShapesModel.parse(
        centres_um, geometry=0, radius=np.full(len(bins), 3.0), index=bins.index, transformations={"global": to_global}
    )
    # triangles whose centroid is the bin centre, but whose vertices reach into neighbouring pseudo-spots
    cx, cy = centres_um[:, 0], centres_um[:, 1]
    tri = np.stack(
        [np.column_stack([cx - 9, cy - 6]), np.column_stack([cx + 9, cy - 6]), np.column_stack([cx, cy + 12])], 1
    )
    triangles = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.polygons(tri), index=pd.RangeIndex(len(bins))),
        transformations={"global": to_global},
    )
    table = sdata.tables["table"]
    for name, el in (("circles", circles), ("triangles", triangles)):
        sdata.shapes[name] = el
        table.obs["region"] = pd.Categorical([name] * table.n_obs)
        table.uns["spatialdata_attrs"]["region"] = name
        _, agg = aggregate_bins(sdata, name, size_um=56, origin_um=(0, 0), inplace=False)
        np.testing.assert_array_equal(agg.X.toarray(), ref.X.toarray(), err_msg=name)
        np.testing.assert_array_equal(agg.obs["n_bins"].to_numpy(), ref.obs["n_bins"].to_numpy())


def test_empty_geometry_is_an_error():
    import shapely

    from genedml_sd.pp import aggregate_bins

    sdata, _ = _synthetic_bins()
    geoms = sdata["bins"].geometry.to_numpy().copy()
    geoms[5] = shapely.Polygon()
    sdata["bins"].geometry = geoms
    with pytest.raises(ValueError, match=r"1 observations of 'bins' \(e.g. index \[5\]\) have no position"):
        aggregate_bins(sdata, "bins", size_um=56)


def test_aggregate_values_same_assignment():
    import genedml_sd as gd
    from genedml_sd.pp import aggregate_bins, aggregate_values

    sdata, dense = _synthetic_bins(n_genes=40, seed=3)
    _, table = aggregate_bins(sdata, "bins", size_um=56, inplace=False)
    rows, cols = np.divmod(np.arange(len(dense)), NX)
    centroids = np.column_stack([cols, rows]) * BIN_UM + BIN_UM / 2
    origin = table.uns["genedml_sd"]["origin_um"]

    cells, summed = aggregate_values(sp.csr_matrix(dense), centroids, 56, origin)
    np.testing.assert_array_equal(cells, table.obs[["array_col", "array_row"]].to_numpy())
    assert sp.issparse(summed) and summed.dtype == np.int32
    np.testing.assert_array_equal(summed.toarray(), table.X.toarray())
    _, dense_sum = aggregate_values(dense, centroids, 56, origin)
    assert isinstance(dense_sum, np.ndarray)
    np.testing.assert_array_equal(dense_sum, table.X.toarray())

    n_bins = table.obs["n_bins"].to_numpy()[:, None]
    _, mean = aggregate_values(dense.astype(np.float32), centroids, 56, origin, reduce="mean")
    np.testing.assert_allclose(mean, table.X.toarray() / n_bins, rtol=1e-12)

    # log-normalised values, weighted by library size: exactly the log-normalised summed counts
    lib = dense.sum(axis=1).astype(np.float64)
    logn = gd.pp.log_normalize(dense)
    _, agg = aggregate_values(logn, centroids, 56, origin, reduce="log1p", weights=lib)
    np.testing.assert_allclose(agg, gd.pp.log_normalize(table.X), rtol=2e-6, atol=2e-6)
    _, agg_sparse = aggregate_values(sp.csr_matrix(logn), centroids, 56, origin, reduce="log1p", weights=lib)
    assert sp.issparse(agg_sparse)
    np.testing.assert_allclose(agg_sparse.toarray(), agg, rtol=1e-12)
    # without weights: log1p of the plain mean of expm1
    _, plain = aggregate_values(logn, centroids, 56, origin, reduce="log1p")
    p0 = np.flatnonzero((cells == [0, 0]).all(axis=1))[0]
    in0 = (cols // 7 == 0) & (rows // 7 == 0)
    np.testing.assert_allclose(plain[p0], np.log1p(np.expm1(logn[in0].astype(np.float64)).mean(axis=0)), rtol=1e-12)


def test_aggregate_values_edges_and_errors():
    from genedml_sd.pp import aggregate_values

    # a centroid on an edge belongs to the pseudo-spot above it: [x0, x0 + size)
    cells, out = aggregate_values(
        np.array([[1], [2], [4]]), np.array([[0.0, 0.0], [56.0, 0.0], [55.999, 0.0]]), 56, (0, 0)
    )
    assert cells.tolist() == [[0, 0], [1, 0]] and out.ravel().tolist() == [5, 2]
    # integer sums that would overflow int32 are made in int64
    big = sp.csr_matrix(np.array([[2**30], [2**30]], dtype=np.int32))
    _, total = aggregate_values(big, np.zeros((2, 2)), 10, (0, 0))
    assert total.dtype == np.int64 and total[0, 0] == 2**31
    with pytest.raises(ValueError, match="one centroid per bin"):
        aggregate_values(np.ones((3, 2)), np.zeros((2, 2)), 10, (0, 0))
    with pytest.raises(ValueError, match="size_um must be a positive"):
        aggregate_values(np.ones((2, 2)), np.zeros((2, 2)), 0, (0, 0))
    with pytest.raises(ValueError, match="origin_um must be two finite"):
        aggregate_values(np.ones((2, 2)), np.zeros((2, 2)), 10, (0, np.nan))
    with pytest.raises(ValueError, match="reduce must be"):
        aggregate_values(np.ones((2, 2)), np.zeros((2, 2)), 10, (0, 0), reduce="max")
    with pytest.raises(ValueError, match="weights apply to"):
        aggregate_values(np.ones((2, 2)), np.zeros((2, 2)), 10, (0, 0), weights=np.ones(2))


def test_aggregate_bins_keys_and_overwrite():
    from genedml_sd.pp import aggregate_bins

    sdata, _ = _synthetic_bins()
    aggregate_bins(sdata, "bins", size_um=56)
    before = sdata.tables["bins_56um_table"].X.toarray()
    with pytest.raises(KeyError, match="'bins_56um' already exists"):
        aggregate_bins(sdata, "bins", size_um=56)
    with pytest.raises(KeyError, match="'bins_56um_table' already exists"):
        aggregate_bins(sdata, "bins", size_um=56, key_added="other", table_key_added="bins_56um_table")
    assert "other" not in sdata  # nothing written when a key is refused
    aggregate_bins(sdata, "bins", size_um=56, origin_um=(-28, -28), overwrite=True)
    assert sdata.tables["bins_56um_table"].X.sum() == before.sum()
    assert sdata.tables["bins_56um_table"].n_obs != before.shape[0]
    with pytest.raises(KeyError, match="'im' exists and is not a shapes element"):
        aggregate_bins(sdata, "bins", size_um=56, key_added="im", overwrite=True)
    with pytest.raises(ValueError, match="must differ"):
        aggregate_bins(sdata, "bins", size_um=56, key_added="bins", overwrite=True)
    with pytest.raises(ValueError, match="must differ"):
        aggregate_bins(sdata, "bins", size_um=56, table_key_added="table", overwrite=True)
    assert len(sdata["bins"]) == NX * NY and sdata.tables["table"].n_obs == NX * NY


def test_aggregate_bins_needs_raw_counts():
    from genedml_sd.pp import aggregate_bins

    sdata, dense = _synthetic_bins()
    table = sdata.tables["table"]
    table.layers["counts"] = table.X.copy()
    table.X = sp.csr_matrix(np.log1p(dense.astype(np.float32)))
    with pytest.raises(ValueError, match=r"table 'table' \(X\) are not raw counts.*looks log-normalised"):
        aggregate_bins(sdata, "bins", size_um=56)
    aggregate_bins(sdata, "bins", size_um=56, layer="counts")
    assert sdata.tables["bins_56um_table"].X.sum() == dense.sum()
    with pytest.raises(ValueError, match=r"size_um must be a positive number of µm, got -1"):
        aggregate_bins(sdata, "bins", size_um=-1)


def test_aggregate_bins_never_uses_predictions():
    from genedml_sd.pp import aggregate_bins

    sdata, _ = _synthetic_bins()
    sdata.tables["table"].uns["genedml_sd"]["kind"] = "predictions"
    with pytest.raises(KeyError, match="No counts table annotates the shapes element 'bins'.*predictions"):
        aggregate_bins(sdata, "bins", size_um=56)


# ---------------------------------------------------------------------------------------------- HER2ST
def test_her2st_bins_aggregate_back_to_spots(demo):
    """8 µm bins under the spots of demo B4 share each spot's UMIs; 200 µm pseudo-spots recover the spots."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import shapely
    from scipy.spatial import cKDTree
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    from genedml_sd.pp import aggregate_bins, spot_grid

    b4 = demo[0]
    sdata = SpatialData(images={"B4_he": b4["B4_he"]})
    um0 = get_pixel_size(b4, "B4_he")
    set_pixel_size(sdata, "B4_he", um0)
    grid = spot_grid(sdata, "B4_he", shape="square", size_um=8, mask=None, inplace=False)
    spots_um = spots_to_pixels(b4, "B4_spots", "B4_he") * um0
    sdata.shapes["all_bins"] = grid
    m = affine_to_pixels(sdata, "all_bins", "B4_he")
    bin_um = (shapely.get_coordinates(grid.geometry.centroid.to_numpy()) @ m[:2, :2].T + m[:2, 2]) * um0
    dist, spot = cKDTree(spots_um).query(bin_um)
    under = dist < 50.0  # bins whose centre lies under a 100 µm spot
    bins = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=grid.geometry.to_numpy()[under], index=pd.RangeIndex(int(under.sum()))),
        transformations=get_transformation(grid, get_all=True),
    )
    del sdata.shapes["all_bins"]
    sdata.shapes["bins"] = bins
    spot, n = spot[under], int(under.sum())

    # split every UMI of each spot to one of its bins at random
    counts = b4.tables["table"].X.tocoo()
    rng = np.random.default_rng(0)
    order = np.argsort(spot, kind="stable")
    start = np.searchsorted(spot[order], np.arange(len(spots_um)))
    k = np.bincount(spot, minlength=len(spots_um))
    assert k.min() >= 100  # pi 50^2 / 8^2 = 123 bins per spot
    umi_spot = np.repeat(counts.row, counts.data)
    umi_gene = np.repeat(counts.col, counts.data)
    umi_bin = order[start[umi_spot] + (rng.random(len(umi_spot)) * k[umi_spot]).astype(np.int64)]
    x = sp.csr_matrix((np.ones(len(umi_bin), dtype=np.int32), (umi_bin, umi_gene)), shape=(n, counts.shape[1]))
    obs = pd.DataFrame({"region": pd.Categorical(["bins"] * n), "bin_id": np.arange(n)}, index=np.arange(n).astype(str))
    table = ad.AnnData(X=x, obs=obs, var=b4.tables["table"].var[[]].copy())
    table.uns["genedml_sd"] = dict(b4.tables["table"].uns["genedml_sd"])
    sdata.tables["bins_table"] = TableModel.parse(table, region="bins", region_key="region", instance_key="bin_id")

    origin = spots_um.min(axis=0) - 100.0  # pseudo-spots of the ST pitch, centred on the first spots
    aggregate_bins(sdata, "bins", size_um=200, origin_um=origin)
    agg = sdata.tables["bins_200um_table"]
    spot_counts = b4.tables["table"].X.toarray()
    assert agg.X.sum() == spot_counts.sum()  # every UMI lands in a pseudo-spot

    # the pseudo-spot holding each spot's centre holds all its UMIs (spot jitter < 50 µm)
    cell = np.floor((spots_um - origin) / 200.0).astype(int)
    where = {(c, r): i for i, (c, r) in enumerate(agg.obs[["array_col", "array_row"]].to_numpy())}
    rows = np.array([where[(c, r)] for c, r in cell])
    alone = np.bincount(rows, minlength=agg.n_obs)[rows] == 1
    exact = (agg.X[rows].toarray() == spot_counts).all(axis=1)
    assert (exact & alone).mean() >= 0.9, (exact.mean(), alone.mean())
    totals = np.asarray(agg.X[rows].sum(axis=1)).ravel()
    assert np.corrcoef(totals, spot_counts.sum(axis=1))[0, 1] > 0.99
    assert agg.n_obs <= len(spots_um) + 10
    assert agg.uns["genedml_sd"]["section"] == "B4" and agg.uns["genedml_sd"]["patient"] == "B"


# ---------------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, threading, time
    import numpy as np, pandas as pd, scipy.sparse as sp, anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Identity
    import genedml_sd as gd

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    side, n_genes, umis = 548, 18000, 200  # 548^2 = 300,304 bins of 8 µm
    img = np.full((3, side, side), 200, dtype=np.uint8)  # 8 µm/px: one bin per pixel
    sdata = SpatialData(images={"im": Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": Identity()})})
    gd.io.set_pixel_size(sdata, "im", 8.0)
    gd.pp.spot_grid(sdata, "im", shape="square", size_um=8, mask=None, key_added="bins")
    n = len(sdata["bins"])
    rng = np.random.default_rng(0)
    genes = np.sort(rng.integers(0, n_genes, size=(n, umis)).astype(np.int16), axis=1, kind="stable")
    x = sp.csr_matrix(
        (np.ones(n * umis, dtype=np.int32), genes.reshape(-1).astype(np.int32), np.arange(0, n * umis + 1, umis)),
        shape=(n, n_genes),
    )
    del genes
    x.sum_duplicates()
    obs = pd.DataFrame({"region": pd.Categorical(["bins"] * n), "bin_id": np.arange(n)}, index=np.arange(n).astype(str))
    sdata.tables["table"] = TableModel.parse(
        ad.AnnData(X=x, obs=obs), region="bins", region_key="region", instance_key="bin_id"
    )
    del x
    before, peak, stop = rss_mib(), [0.0], [False]

    def poll():
        while not stop[0]:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    gd.pp.aggregate_bins(sdata, "bins", size_um=56)
    seconds = time.perf_counter() - t0
    stop[0] = True
    thread.join()
    out, src = sdata.tables["bins_56um_table"], sdata.tables["table"]
    print(json.dumps({
        "n_bins": n, "nnz": int(src.X.nnz), "total_in": int(src.X.sum()), "total_out": int(out.X.sum()),
        "n_spots": int(out.n_obs), "sparse_int": bool(sp.issparse(out.X) and out.X.dtype == np.int32),
        "rss_before_mib": before, "rss_peak_during_mib": max(peak[0], before), "seconds": seconds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    """
)


def test_aggregate_memory_300k_bins_18k_genes():
    """300,304 bins x 18,000 genes at 200 UMIs per bin (6e7 stored counts): peak RSS well below 4 GiB."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    assert res["n_bins"] == 300_304 and res["nnz"] > 5.9e7
    assert res["total_out"] == res["total_in"] == 300_304 * 200 and res["sparse_int"]
    assert res["n_spots"] == 79 * 79  # ceil(548 / 7) pseudo-spots of 7 x 7 bins per side
    assert res["max_rss_mib"] < 3 * 1024  # whole process, building the inputs included
    assert res["rss_peak_during_mib"] - res["rss_before_mib"] < 1024  # the aggregation itself


def _perfect_predictions(sdata, dense):
    """A prediction table of the bins holding their exact log-normalised counts (what a perfect model predicts)."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    lib = dense.sum(axis=1, keepdims=True).astype(np.float64)
    x = np.log1p(1e4 * dense / np.where(lib > 0, lib, 1.0))
    n = len(dense)
    obs = pd.DataFrame(
        {"region": pd.Categorical(["bins"] * n), "spot_id": np.arange(n)}, index=[f"p{i}" for i in range(n)]
    )
    table = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=sdata.tables["table"].var_names))
    table.uns["genedml_sd"] = {"kind": "predictions", "gene_ranking": list(table.var_names[:5])}
    sdata.tables["pred"] = TableModel.parse(table, region="bins", region_key="region", instance_key="spot_id")
    return x


@pytest.mark.parametrize("shuffle_table", [False, True])
def test_aggregate_predictions_pools_like_the_counts(shuffle_table):
    import genedml_sd as gd

    sdata, dense = _synthetic_bins(shuffle_table=shuffle_table)
    gd.pp.aggregate_bins(sdata, "bins", size_um=56, key_added="spots")
    x = _perfect_predictions(sdata, dense)
    gd.tl.aggregate_predictions(sdata, "spots", pred_key="pred")
    pooled = sdata.tables["pred_spots"]
    coarse = sdata.tables["spots_table"].X.toarray().astype(np.float64)
    # library-size weights: pooled perfect predictions are exactly the log-normalised summed counts
    expected = np.log1p(1e4 * coarse / coarse.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(pooled.X, expected, rtol=2e-6, atol=2e-6)
    _, _, n_bins = _expected(dense, 7)
    np.testing.assert_array_equal(pooled.obs["n_predicted"].to_numpy(), n_bins)
    assert pooled.uns["genedml_sd"]["kind"] == "predictions" and pooled.uns["genedml_sd"]["aggregated_from"] == "pred"
    ev = gd.tl.evaluate(sdata, pred_key="pred_spots", inplace=False)
    assert ev.summary["table_key"] == "spots_table" and ev.summary["n_spots"] == 12
    np.testing.assert_allclose(ev.per_gene.loc[~ev.per_gene["constant"], "pcc"], 1.0, atol=1e-5)

    # equal weights: log1p of the plain mean of expm1 over the bins of each pseudo-spot, by hand
    table = gd.tl.aggregate_predictions(sdata, "spots", pred_key="pred", weights=None, inplace=False)
    rows, cols = np.divmod(np.arange(len(dense)), NX)
    first = (rows // 7 == 0) & (cols // 7 == 0)  # pseudo-spot (0, 0) is row 0 of the coarse table
    np.testing.assert_allclose(table.X[0], np.log1p(np.expm1(x[first]).mean(axis=0)), rtol=2e-6)
    assert table.uns["genedml_sd"]["weights"] == "equal"


def test_aggregate_predictions_errors():
    import genedml_sd as gd

    sdata, dense = _synthetic_bins()
    _perfect_predictions(sdata, dense)
    with pytest.raises(ValueError, match="lacks the pseudo-spot grid of gd.pp.aggregate_bins"):
        gd.tl.aggregate_predictions(sdata, "bins", pred_key="pred")
    gd.pp.aggregate_bins(sdata, "bins", size_um=56, key_added="spots")
    with pytest.raises(ValueError, match="'table' is not a prediction table"):
        gd.tl.aggregate_predictions(sdata, "spots", pred_key="table")
    with pytest.raises(ValueError, match="weights must be 'library' or None"):
        gd.tl.aggregate_predictions(sdata, "spots", pred_key="pred", weights="counts")
    gd.tl.aggregate_predictions(sdata, "spots", pred_key="pred", key_added="pooled")
    with pytest.raises(KeyError, match="pooled"):
        gd.tl.aggregate_predictions(sdata, "spots", pred_key="pred", key_added="pooled")
    # predictions on only some of the bins leave pseudo-spots without predictions: an error
    sdata.tables["pred"] = sdata.tables["pred"][:100].copy()
    import spatialdata as sd

    small = sd.SpatialData(
        images=dict(sdata.images),
        shapes={"bins": sdata["bins"].iloc[:100], "spots": sdata["spots"]},
        tables={"pred": sdata.tables["pred"], "spots_table": sdata.tables["spots_table"]},
        attrs=dict(sdata.attrs),
    )
    with pytest.raises(ValueError, match="pseudo-spots of 'spots' contain no observation of 'bins'"):
        gd.tl.aggregate_predictions(small, "spots", pred_key="pred")
