from __future__ import annotations

import re

import numpy as np
import pytest

from genedml_sd._spatial import get_pixel_size, image_levels, set_pixel_size, spot_radius_px, spots_to_pixels

# ---------------------------------------------------------------------------------------------- helpers
SQUARE_ROWS, SQUARE_COLS = (160, 320), (192, 448)  # tissue square of the synthetic image, scale0 px
SYN_UM_PER_PX = 2.0


def _affine(element, cs="global"):
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _b4_view(demo):
    """A fresh SpatialData sharing B4's image and spots (the session fixture stays untouched)."""
    from spatialdata import SpatialData

    b4 = demo[0]
    view = SpatialData(images={"B4_he": b4["B4_he"]}, shapes={"B4_spots": b4["B4_spots"]})
    set_pixel_size(view, "B4_he", get_pixel_size(b4, "B4_he"))
    return view


def _synthetic(*, blank=False, multiscale=False, white=False):
    """White 600 x 480 px image at 2 µm/px with a purple square of 'tissue', Scale(2, 2) to global."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(0)
    img = rng.integers(242, 256, size=(3, 480, 600)).astype(np.uint8)  # slightly noisy glass
    if white:
        img[:] = 255
    if not blank:
        img[:, slice(*SQUARE_ROWS), slice(*SQUARE_COLS)] = np.array([150, 80, 160], dtype=np.uint8)[:, None, None]
    el = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2] if multiscale else None,
        transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))},
    )
    sdata = SpatialData(images={"syn_he": el})
    set_pixel_size(sdata, "syn_he", SYN_UM_PER_PX)
    return sdata


def _snapshot(sdata):
    from spatialdata.transformations import get_transformation

    return (
        {name: get_transformation(el, get_all=True) for _, name, el in sdata._gen_elements()},
        {name: (el.shape if hasattr(el, "shape") else None) for _, name, el in sdata._gen_elements()},
        dict(sdata.attrs),
    )


def _assert_only_added(before, after, new_key):
    (tf0, shapes0, attrs0), (tf1, shapes1, attrs1) = before, after
    assert set(tf1) == set(tf0) | {new_key}
    for name, t in tf0.items():
        assert {cs: repr(v) for cs, v in tf1[name].items()} == {cs: repr(v) for cs, v in t.items()}
        assert shapes1[name] == shapes0[name]
    assert attrs1 == attrs0


def _nn_distances(xy):
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


# ---------------------------------------------------------------------------------------------- tissue mask, B4
def test_tissue_mask_covers_b4_spots(demo, monkeypatch):
    import genedml_sd.pp._tissue as grid_mod
    from genedml_sd.pp._tissue import tissue_mask

    sdata = _b4_view(demo)
    um0 = get_pixel_size(sdata, "B4_he")

    # The two finest levels (<= 2.8 µm/px) must never be computed: make them explode if they are.
    real_levels = grid_mod.image_levels

    def guarded_levels(image):
        levels = real_levels(image)
        if len(levels) < 3:
            return levels

        def boom(block):
            raise AssertionError("a fine pyramid level was computed")

        return [lv.copy(data=lv.data.map_blocks(boom, dtype=lv.dtype)) for lv in levels[:2]] + levels[2:]

    monkeypatch.setattr(grid_mod, "image_levels", guarded_levels)
    before = _snapshot(sdata)
    tissue_mask(sdata, "B4_he")
    _assert_only_added(before, _snapshot(sdata), "B4_he_tissue")
    monkeypatch.undo()

    mask = sdata.labels["B4_he_tissue"]
    values = np.asarray(mask.values)
    assert values.dtype == np.uint8 and set(np.unique(values)) == {0, 1}
    # mask pixel size from its transformation, relative to the image's scale0 pixels
    m_mask, m_img = _affine(mask), _affine(sdata["B4_he"])
    px_scale0 = np.diag(np.linalg.inv(m_img[:2, :2]) @ m_mask[:2, :2])
    mask_um = px_scale0 * um0
    assert np.all(mask_um >= 8.0) and np.all(mask_um <= 16.0 + 1e-6), mask_um
    assert np.allclose(values.shape, np.array(image_levels(sdata["B4_he"])[0].shape[1:]) / px_scale0[::-1], atol=1)

    # >= 95 % of the measured ST spots fall on tissue pixels
    spots = sdata["B4_spots"]
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    inv = np.linalg.inv(m_mask)
    q = np.floor(xy @ inv[:2, :2].T + inv[:2, 2]).astype(int)
    assert q.min() >= 0 and (q[:, 0] < values.shape[1]).all() and (q[:, 1] < values.shape[0]).all()
    on_tissue = values[q[:, 1], q[:, 0]] == 1
    assert on_tissue.mean() >= 0.95, on_tissue.mean()
    assert 0.2 <= values.mean() <= 0.9, values.mean()


def test_tissue_mask_not_inplace_and_overwrite(demo):
    from genedml_sd.pp._tissue import tissue_mask

    sdata = _b4_view(demo)
    mask = tissue_mask(sdata, "B4_he", inplace=False)
    assert "B4_he_tissue" not in sdata
    assert mask.dims == ("y", "x")
    tissue_mask(sdata, "B4_he", key_added="m")
    with pytest.raises(KeyError, match="already exists"):
        tissue_mask(sdata, "B4_he", key_added="m")
    tissue_mask(sdata, "B4_he", key_added="m", overwrite=True)
    np.testing.assert_array_equal(sdata.labels["m"].values, mask.values)


# ---------------------------------------------------------------------------------------------- spot grid, B4
def test_spot_grid_b4(demo):
    from genedml_sd.pp._grid import spot_grid

    sdata = _b4_view(demo)
    um0 = get_pixel_size(sdata, "B4_he")
    h0, w0 = image_levels(sdata["B4_he"])[0].shape[1:]
    n_real = len(sdata["B4_spots"])
    assert n_real == 283

    before = _snapshot(sdata)
    spot_grid(sdata, "B4_he", spacing_um=200, diameter_um=100, lattice="square", key_added="sq")
    _assert_only_added(before, _snapshot(sdata), "sq")
    grid = sdata["sq"]
    n_sq = len(grid)
    assert abs(n_sq - n_real) <= 0.25 * n_real, n_sq
    assert list(grid.index) == list(range(n_sq))

    xy = spots_to_pixels(sdata, "sq", "B4_he")  # scale0 px
    r_px = spot_radius_px(sdata, "sq", "B4_he")
    np.testing.assert_allclose(r_px * um0, 50.0, rtol=1e-4)
    assert (xy[:, 0] - r_px >= -1e-6).all() and (xy[:, 0] + r_px <= w0 + 1e-6).all()
    assert (xy[:, 1] - r_px >= -1e-6).all() and (xy[:, 1] + r_px <= h0 + 1e-6).all()
    np.testing.assert_allclose(_nn_distances(xy * um0), 200.0, rtol=1e-9)

    hexes = spot_grid(sdata, "B4_he", spacing_um=100, diameter_um=55, lattice="hex", inplace=False)
    assert "B4_he_grid" not in sdata
    ratio = len(hexes) / n_sq
    assert 4.2 <= ratio <= 5.0, ratio  # ideal density ratio 8 / sqrt(3) = 4.62
    sdata.shapes["hx"] = hexes
    np.testing.assert_allclose(_nn_distances(spots_to_pixels(sdata, "hx", "B4_he") * um0), 100.0, rtol=1e-9)


def test_spot_grid_readable_by_spot_tiler(demo):
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    from genedml_sd.pp._grid import spot_grid
    from genedml_sd.tiling import SpotTiler

    sdata = _b4_view(demo)
    um0 = get_pixel_size(sdata, "B4_he")
    spot_grid(sdata, "B4_he", spacing_um=200, diameter_um=100, lattice="square")
    tiler = SpotTiler(sdata, "B4_he", "B4_he_grid")
    assert tiler.n_spots == len(sdata["B4_he_grid"])

    # a grid spot near the middle of the grid, and its position in µm from the image's own Scale
    grid = sdata["B4_he_grid"]
    gxy = np.column_stack([grid.geometry.x, grid.geometry.y])
    i = int(np.argmin(np.linalg.norm(gxy - np.median(gxy, axis=0), axis=1)))
    m_img = _affine(sdata["B4_he"])
    sx, sy = m_img[0, 0], m_img[1, 1]  # B4: a pure Scale from image px to global
    assert m_img[0, 1] == 0 and m_img[1, 0] == 0 and m_img[0, 2] == 0 and m_img[1, 2] == 0
    pos_um = np.array([gxy[i, 0] / sx * um0, gxy[i, 1] / sy * um0])

    # a one-spot circles element placed by hand in µm units, with a µm -> global Scale
    hand = ShapesModel.parse(
        pos_um[None, :],
        geometry=0,
        radius=np.array([50.0]),
        transformations={"global": Scale([sx / um0, sy / um0], axes=("x", "y"))},
    )
    sdata.shapes["hand"] = hand
    hand_tiler = SpotTiler(sdata, "B4_he", "hand")
    np.testing.assert_allclose(hand_tiler.centres_px(0)[0], tiler.centres_px(0)[i], atol=1e-6)

    tiles = tiler.local_tiles([0, i])
    assert tiles.shape == (2, 3, tiler.geometry.tile_px, tiler.geometry.tile_px)
    assert tiles.dtype == np.uint8
    assert tiles[1].std() > 5  # tissue, not blank padding
    np.testing.assert_array_equal(tiles[1], hand_tiler.local_tiles([0])[0])


# ---------------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("multiscale", [False, True])
def test_synthetic_square_with_scale_transform(multiscale):
    from genedml_sd.pp import spot_grid, tissue_mask

    sdata = _synthetic(multiscale=multiscale)
    tissue_mask(sdata, "syn_he", target_um_per_px=8.0)
    mask = sdata.labels["syn_he_tissue"]
    # 8 µm/px mask = 4 image px, times the image's Scale(2, 2) to global
    np.testing.assert_allclose(_affine(mask), np.diag([8.0, 8.0, 1.0]), atol=1e-9)
    expected = np.zeros((120, 150), dtype=np.uint8)
    expected[SQUARE_ROWS[0] // 4 : SQUARE_ROWS[1] // 4, SQUARE_COLS[0] // 4 : SQUARE_COLS[1] // 4] = 1
    np.testing.assert_array_equal(mask.values, expected)

    grid = spot_grid(sdata, "syn_he", spacing_um=20, diameter_um=10, lattice="square", inplace=False)
    sdata.shapes["g"] = grid
    xy = spots_to_pixels(sdata, "g", "syn_he")  # image scale0 px
    assert (xy[:, 0] >= SQUARE_COLS[0]).all() and (xy[:, 0] < SQUARE_COLS[1]).all()
    assert (xy[:, 1] >= SQUARE_ROWS[0]).all() and (xy[:, 1] < SQUARE_ROWS[1]).all()
    area_um2 = np.diff(SQUARE_ROWS)[0] * np.diff(SQUARE_COLS)[0] * SYN_UM_PER_PX**2
    assert abs(len(grid) - area_um2 / 20**2) <= 0.1 * area_um2 / 20**2
    # stored in global units: centres = 2 x pixels, radius 5 µm = 2.5 px = 5 global units
    np.testing.assert_allclose(np.column_stack([grid.geometry.x, grid.geometry.y]), 2 * xy)
    np.testing.assert_allclose(grid["radius"], 5.0)
    np.testing.assert_allclose(_nn_distances(xy * SYN_UM_PER_PX), 20.0)

    # the stored mask gives the same grid as the automatic one; no mask covers the whole image
    by_key = spot_grid(
        sdata, "syn_he", spacing_um=20, diameter_um=10, lattice="square", mask="syn_he_tissue", inplace=False
    )
    np.testing.assert_allclose(np.asarray(by_key.geometry.x), np.asarray(grid.geometry.x))
    everywhere = spot_grid(sdata, "syn_he", spacing_um=20, diameter_um=10, lattice="square", mask=None, inplace=False)
    assert len(everywhere) == (600 // 10) * (480 // 10)


def test_tissue_mask_explicit_level():
    from genedml_sd.pp._tissue import tissue_mask

    sdata = _synthetic(multiscale=True)
    mask = tissue_mask(sdata, "syn_he", level=1, inplace=False)
    assert mask.shape == (240, 300)
    np.testing.assert_allclose(_affine(mask), np.diag([4.0, 4.0, 1.0]), atol=1e-9)
    assert mask.values[SQUARE_ROWS[0] // 2 + 1 : SQUARE_ROWS[1] // 2 - 1, SQUARE_COLS[0] // 2 + 1].all()


# ---------------------------------------------------------------------------------------------- errors
def test_spacing_smaller_than_diameter():
    from genedml_sd.pp._grid import spot_grid

    sdata = _synthetic()
    with pytest.raises(ValueError, match=r"spacing_um=50.*diameter_um=100"):
        spot_grid(sdata, "syn_he", spacing_um=50, diameter_um=100)
    assert list(sdata.shapes) == []


def test_blank_image_has_no_tissue():
    from genedml_sd.pp import spot_grid, tissue_mask

    sdata = _synthetic(blank=True)
    with pytest.raises(ValueError, match=r"no tissue.*syn_he"):
        tissue_mask(sdata, "syn_he")
    with pytest.raises(ValueError, match="no tissue"):
        spot_grid(sdata, "syn_he", spacing_um=20, diameter_um=10)
    assert list(sdata.labels) == [] and list(sdata.shapes) == []


def test_no_tissue_message_says_what_was_measured():
    from genedml_sd.pp._tissue import tissue_mask

    with pytest.raises(ValueError) as err:  # pure white: no contrast at all, no threshold
        tissue_mask(_synthetic(blank=True, white=True), "syn_he")
    msg = str(err.value)
    assert "inf" not in msg and "no tissue in image 'syn_he' (level 0, 16 µm/px" in msg
    assert "ranges 0-0 (median 0, 99th percentile 0) and the image is uniform" in msg
    assert "so 'otsu' finds no threshold" in msg
    with pytest.raises(ValueError) as err:  # noisy glass: OD <= -log10(242 / 255) = 0.023
        tissue_mask(_synthetic(blank=True), "syn_he", method="triangle")
    msg = str(err.value)
    assert "inf" not in msg and re.search(r"ranges 0\.0\d+-0\.0[12]\d* \(median 0\.01", msg), msg
    assert "the 'triangle' threshold is 0.0" in msg and "raised to the minimal tissue optical density 0.05; 0 px" in msg
    with pytest.raises(ValueError, match=r"the fixed threshold is 2; 0 px exceed it"):
        tissue_mask(_synthetic(), "syn_he", method=2.0)
    # the tissue square (OD -log10(80 / 255) = 0.50) is found, then dropped as too small
    with pytest.raises(ValueError, match=r"ranges 0\.0\d+-0\.503 .*; \d+ px exceed it, all in too small pieces"):
        tissue_mask(_synthetic(), "syn_he", min_area_um2=1e9)


def test_existing_key_needs_overwrite():
    from genedml_sd.pp._grid import spot_grid

    sdata = _synthetic()
    spot_grid(sdata, "syn_he", spacing_um=20, diameter_um=10)
    n = len(sdata["syn_he_grid"])
    with pytest.raises(KeyError, match="syn_he_grid"):
        spot_grid(sdata, "syn_he", spacing_um=40, diameter_um=10)
    assert len(sdata["syn_he_grid"]) == n
    spot_grid(sdata, "syn_he", spacing_um=40, diameter_um=10, overwrite=True)
    assert len(sdata["syn_he_grid"]) < n
    with pytest.raises(KeyError, match="syn_he"):  # an image is never replaced by a grid
        spot_grid(sdata, "syn_he", key_added="syn_he", overwrite=True)


def test_mask_in_other_coordinate_system():
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Identity

    from genedml_sd.pp._grid import spot_grid

    sdata = _synthetic()
    sdata.labels["elsewhere"] = Labels2DModel.parse(
        np.ones((10, 10), dtype=np.uint8), dims=("y", "x"), transformations={"other": Identity()}
    )
    with pytest.raises(ValueError, match=r"elsewhere.*syn_he|syn_he.*elsewhere"):
        spot_grid(sdata, "syn_he", mask="elsewhere")
    with pytest.raises(KeyError, match="nope"):
        spot_grid(sdata, "syn_he", mask="nope")


# ---------------------------------------------------------------------------------------------- square bins
def _corners(grid):
    """Corners (n, 4, 2) of square polygons, in the element's own coordinates (closing vertex dropped)."""
    import shapely

    coords = shapely.get_coordinates(grid.geometry.to_numpy()).reshape(len(grid), 5, 2)
    return coords[:, :4]


def _to_px(sdata, key, image_key, pts):
    from genedml_sd._spatial import affine_to_pixels

    m = affine_to_pixels(sdata, key, image_key)
    return pts @ m[:2, :2].T + m[:2, 2]


def test_square_bins_exact_geometry_synthetic():
    from genedml_sd.pp import spot_grid

    sdata = _synthetic()
    spot_grid(sdata, "syn_he", shape="square", size_um=8, mask=None)
    grid = sdata["syn_he_bins_8um"]
    # 600 x 480 px at 2 µm/px = 1200 x 960 µm, tiled by 8 µm bins without gaps or margins
    assert len(grid) == 150 * 120
    assert set(grid.geometry.geom_type) == {"Polygon"}
    np.testing.assert_array_equal(grid["side_um"].to_numpy(), 8.0)
    corners = _corners(grid)
    px = _to_px(sdata, "syn_he_bins_8um", "syn_he", corners.reshape(-1, 2)).reshape(corners.shape)
    um = px * SYN_UM_PER_PX
    lo, hi = um.min(axis=1), um.max(axis=1)
    np.testing.assert_allclose(hi - lo, 8.0, atol=1e-9)  # side 8 µm = 4 px
    np.testing.assert_allclose(px.max(axis=1) - px.min(axis=1), 4.0, atol=1e-9)
    # bin (col, row) covers [8 col, 8 col + 8) x [8 row, 8 row + 8) µm, row-major order
    rows, cols = np.divmod(np.arange(len(grid)), 150)
    np.testing.assert_allclose(lo, np.column_stack([8.0 * cols, 8.0 * rows]), atol=1e-9)
    # four distinct corners: an axis-aligned square, not a degenerate polygon
    for k in range(2):
        assert (np.unique(np.round(um[:, :, k] - lo[:, None, k], 9), axis=1).shape[1]) == 2
    # stored in global units: the image's Scale(2, 2) from px
    np.testing.assert_allclose(corners, 2 * px, atol=1e-9)
    np.testing.assert_allclose(grid.geometry.area.to_numpy(), 8.0**2, rtol=1e-12)  # 4 px x 2 = 8 global units


def test_square_bins_on_tissue_b4(demo):
    import shapely

    from genedml_sd.pp import spot_grid

    sdata = _b4_view(demo)
    um0 = get_pixel_size(sdata, "B4_he")
    h0, w0 = image_levels(sdata["B4_he"])[0].shape[1:]
    grid = spot_grid(sdata, "B4_he", shape="square", size_um=56, inplace=False)
    assert "B4_he_bins_56um" not in sdata
    sdata.shapes["sq56"] = grid
    corners = _corners(grid)
    px = _to_px(sdata, "sq56", "B4_he", corners.reshape(-1, 2)).reshape(corners.shape)
    lo = px.min(axis=1)
    np.testing.assert_allclose((px.max(axis=1) - lo) * um0, 56.0, rtol=1e-9)
    assert (lo >= -1e-6).all() and (px.max(axis=1) <= np.array([w0, h0]) + 1e-6).all()
    # bins sit on one lattice of 56 µm: lower corners are whole multiples of the side apart
    steps = (lo - lo.min(axis=0)) * um0 / 56.0
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    # bins tile without overlap and their centres are on tissue: the measured spots lie in them
    assert shapely.union_all(grid.geometry.to_numpy()).area == pytest.approx(grid.geometry.area.sum(), rel=1e-9)
    full = spot_grid(sdata, "B4_he", shape="square", size_um=56, mask=None, inplace=False)
    assert 0.2 * len(full) < len(grid) < 0.9 * len(full)
    centres = np.column_stack([sdata["B4_spots"].geometry.x, sdata["B4_spots"].geometry.y])
    inside = shapely.contains_xy(shapely.union_all(grid.geometry.to_numpy()), centres[:, 0], centres[:, 1])
    assert inside.mean() >= 0.95
    # the tiler reads the squares like spots: tiles centred on the square centres
    from genedml_sd.tiling import SpotTiler

    tiler = SpotTiler(sdata, "B4_he", "sq56")
    np.testing.assert_allclose(tiler.centres_px(0), lo + 28.0 / um0, atol=1e-6)


def test_square_bins_rotated_image():
    """Under a rotation, bins are squares in image pixels and rotated squares in the global system."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    from genedml_sd.pp import spot_grid

    c, s = np.cos(0.3), np.sin(0.3)
    rot = Affine(np.array([[2 * c, -2 * s, 10.0], [2 * s, 2 * c, -5.0], [0, 0, 1]]), ("x", "y"), ("x", "y"))
    img = np.full((3, 100, 120), 200, dtype=np.uint8)
    sdata = SpatialData(images={"im": Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": rot})})
    set_pixel_size(sdata, "im", 0.5)
    spot_grid(sdata, "im", shape="square", size_um=10, spacing_um=12.5, mask=None, key_added="b")
    grid = sdata["b"]
    assert len(grid) == 5 * 4  # floor((60 - 10) / 12.5) + 1 columns, floor((50 - 10) / 12.5) + 1 rows
    corners = _corners(grid)
    px = _to_px(sdata, "b", "im", corners.reshape(-1, 2)).reshape(corners.shape)
    np.testing.assert_allclose((px.max(axis=1) - px.min(axis=1)) * 0.5, 10.0, atol=1e-9)
    lo = px.min(axis=1) * 0.5  # µm; the lattice is centred: margins (60 - 60) / 2 and (50 - 47.5) / 2
    np.testing.assert_allclose(np.unique(np.round(lo[:, 0], 9)), [0.0, 12.5, 25.0, 37.5, 50.0], atol=1e-9)
    np.testing.assert_allclose(np.unique(np.round(lo[:, 1], 9)), [1.25, 13.75, 26.25, 38.75], atol=1e-9)
    np.testing.assert_allclose(grid.geometry.area.to_numpy(), (10 / 0.5 * 2) ** 2, rtol=1e-9)  # global units


def test_square_bins_errors():
    from genedml_sd.pp import spot_grid

    sdata = _synthetic()
    with pytest.raises(ValueError, match="needs size_um"):
        spot_grid(sdata, "syn_he", shape="square")
    with pytest.raises(ValueError, match="square lattice"):
        spot_grid(sdata, "syn_he", shape="square", size_um=8, lattice="hex")
    with pytest.raises(ValueError, match=r"size_um=8 is the side of square bins"):
        spot_grid(sdata, "syn_he", size_um=8)
    with pytest.raises(ValueError, match=r"spacing_um=4 is smaller than size_um=8.*bins would overlap"):
        spot_grid(sdata, "syn_he", shape="square", size_um=8, spacing_um=4)
    with pytest.raises(ValueError, match="shape must be 'circle' or 'square'"):
        spot_grid(sdata, "syn_he", shape="hexagon")
    assert list(sdata.shapes) == []


def test_million_square_bins_are_vectorised():
    """10^6 bins (1000 x 1000 of 8 µm) are built by vectorised shapely calls: about 2 s of CPU, not minutes."""
    import time

    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from genedml_sd.pp import spot_grid

    img = np.full((3, 1000, 1000), 200, dtype=np.uint8)
    sdata = SpatialData(
        images={"im": Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": Identity()})}
    )
    set_pixel_size(sdata, "im", 8.0)
    cpu = time.process_time()
    grid = spot_grid(sdata, "im", shape="square", size_um=8, mask=None, inplace=False)
    cpu = time.process_time() - cpu
    assert len(grid) == 10**6
    assert cpu < 20.0, cpu
    np.testing.assert_allclose(grid.geometry.iloc[-1].bounds, (999.0, 999.0, 1000.0, 1000.0))  # global = px of 8 µm
