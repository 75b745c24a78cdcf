"""gd.datasets.*_layout: platform outputs written from the demo's B4, read back with the gd.io readers.

Every check compares what the reader returns with the shipped demo itself (its image, spot centres and
ERBB2 counts), not with the writer's own bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd._spatial import image_levels, spots_to_pixels


@pytest.fixture(scope="module")
def b4():
    """The demo section: H&E (H, W, 3), µm/px, spot centres (px) and ERBB2 counts per spot."""
    (s,) = gd.datasets.her2st_demo(["B4"])
    table = s.tables["table"]
    return {
        "image": s["B4_he"]["scale0"]["image"].values.transpose(1, 2, 0),
        "um": gd.io.get_pixel_size(s, "B4_he"),
        "xy": spots_to_pixels(s, "B4_spots", "B4_he"),
        "erbb2": np.asarray(table[:, "ERBB2"].X.todense()).ravel().astype(np.int64),
    }


def _crop_origin(b4, side):
    """Top-left corner (x, y) of a ``side`` px crop centred on the median spot centre (as documented)."""
    return np.median(b4["xy"], axis=0).round().astype(int) - side // 2


def _nearest(xy, b4):
    d = np.linalg.norm(xy[:, None, :] - b4["xy"][None], axis=2)
    return d.argmin(axis=1), d.min(axis=1) * b4["um"]


def _gene(sdata, gene="ERBB2"):
    table = sdata.tables["table"]
    return np.asarray(table[:, gene].X.todense()).ravel()


def test_visium_hd_layout_bins_add_up_to_the_demo_spots(b4, tmp_path):
    outs = gd.datasets.visium_hd_layout(tmp_path / "hd")
    assert outs == tmp_path / "hd" / "outs" and (outs.parent / "microscope.tif").is_file()
    s = gd.io.visium_hd(outs, bin_size=8, fullres_image_file=outs.parent / "microscope.tif")
    he, bins = "HER2ST_B4_hd_he", "HER2ST_B4_hd_square_008um"
    um = gd.io.get_pixel_size(s, he)
    assert um == pytest.approx(b4["um"], rel=1e-2)
    np.testing.assert_allclose(s[bins].geometry.area.to_numpy() * um**2, 64.0, rtol=1e-2)  # 8 x 8 µm squares
    x0, y0 = _crop_origin(b4, 1100)
    level0 = image_levels(s[he])[0]
    assert level0.shape[1:] == (1100, 1100)
    np.testing.assert_array_equal(
        level0[:, 500:600, 400:500].values.transpose(1, 2, 0), b4["image"][y0 + 500 : y0 + 600, x0 + 400 : x0 + 500]
    )
    table = s.tables["table"]
    assert table.X.format == "csr" and table.X.nnz < 0.5 * np.prod(table.shape)  # sparse, never densified

    centres = np.column_stack([s[bins].geometry.centroid.x, s[bins].geometry.centroid.y]) + (x0, y0)
    spot, dist_um = _nearest(centres, b4)
    assert dist_um.max() < 50.0  # every bin read is under a demo spot ...
    erbb2 = _gene(s)
    inner = [
        i
        for i, (x, y) in enumerate(b4["xy"] - (x0, y0))
        if min(x, y) * b4["um"] > 60 and max(x, y) * b4["um"] < 1100 * b4["um"] - 60
    ]
    assert len(inner) >= 20
    for i in inner:  # ... and the ERBB2 counts of its bins add up to the spot's, with pi 50² / 8² bins each
        under = spot == i
        assert 110 <= under.sum() <= 135
        assert erbb2[under].sum() == b4["erbb2"][i]

    s16 = gd.io.visium_hd(outs, bin_size=16)
    area_um2 = s16["HER2ST_B4_hd_square_016um"].geometry.area.to_numpy() * b4["um"] ** 2
    np.testing.assert_allclose(area_um2, 256.0, rtol=1e-2)
    assert _gene(s16).sum() == erbb2.sum()  # 16 µm bins are sums of 8 µm ones
    assert s16.tables["table"].n_obs < table.n_obs / 2


def test_visium_layout_spots_are_thinned_demo_spots(b4, tmp_path):
    outs = gd.datasets.visium_layout(tmp_path / "visium")
    assert outs == tmp_path / "visium" / "outs"
    s = gd.io.visium(outs, fullres_image_file=outs.parent / "fullres.tif")
    he, spots = "HER2ST_B4_visium_he", "HER2ST_B4_visium_spots"
    assert gd.io.get_pixel_size(s, he) == pytest.approx(b4["um"], rel=1e-2)
    np.testing.assert_array_equal(
        image_levels(s[he])[0][:, 1000:1100, 1200:1300].values.transpose(1, 2, 0), b4["image"][1000:1100, 1200:1300]
    )
    xy = spots_to_pixels(s, spots, he)
    nearest, dist_um = _nearest(xy, b4)
    # Space Ranger writes whole pixels: within 100 µm (+ 1 px) of a demo spot; 100 µm lattice vs 200 µm ST
    assert dist_um.max() < 100.0 + b4["um"] and len(xy) > len(b4["xy"])
    erbb2 = _gene(s)
    assert (erbb2 <= b4["erbb2"][nearest]).all()  # binomial thinning of the nearest spot's counts
    assert erbb2.sum() / b4["erbb2"][nearest].sum() == pytest.approx(0.55**2, rel=0.1)


def test_xenium_layout_cells_on_the_aligned_he(b4, tmp_path):
    root = gd.datasets.xenium_layout(tmp_path / "xenium")
    assert root == tmp_path / "xenium"
    s = gd.io.xenium(root)
    he, cells = "HER2ST_B4_region_he", "HER2ST_B4_region_cells"
    assert set(s.shapes) == {cells}
    assert gd.io.get_pixel_size(s, he) == pytest.approx(b4["um"], rel=1e-2)
    x0, y0 = _crop_origin(b4, 640)
    np.testing.assert_array_equal(
        image_levels(s[he])[0][:, 200:300, 300:400].values.transpose(1, 2, 0),
        b4["image"][y0 + 200 : y0 + 300, x0 + 300 : x0 + 400],
    )
    xy = spots_to_pixels(s, cells, he) + (x0, y0)  # cell centres on the demo image
    nearest, dist_um = _nearest(xy, b4)
    assert len(xy) > 300 and dist_um.max() < 150.0
    erbb2 = _gene(s)
    assert (erbb2 <= b4["erbb2"][nearest]).all()
    radius_um = s[cells]["radius"].to_numpy()
    assert 3.0 < radius_um.min() and radius_um.max() < 8.0


def test_wsi_layout_svs_pixel_size_and_pixels(b4, tmp_path):
    import tifffile

    slide = gd.datasets.wsi_layout(tmp_path / "native")
    with tifffile.TiffFile(slide) as tif:
        assert tif.is_svs and len(tif.series[0].levels) == 3
    s = gd.io.wsi(slide)
    assert list(s.images) == ["HER2ST_B4_he"]
    assert gd.io.get_pixel_size(s, "HER2ST_B4_he") == pytest.approx(b4["um"], rel=1e-2)
    window = image_levels(s["HER2ST_B4_he"])[0][:, 1000:1224, 1200:1424].values.transpose(1, 2, 0)
    assert np.abs(window.astype(int) - b4["image"][1000:1224, 1200:1424]).mean() < 4  # JPEG of the demo H&E

    resampled = gd.datasets.wsi_layout(tmp_path / "x1.7", mpp=0.8)
    r = gd.io.wsi(resampled)
    assert gd.io.get_pixel_size(r, "HER2ST_B4_he") == pytest.approx(0.8, rel=1e-2)
    h, w = b4["image"].shape[:2]
    level0 = image_levels(r["HER2ST_B4_he"])[0]
    assert level0.shape[1:] == (round(h * b4["um"] / 0.8), round(w * b4["um"] / 0.8))  # same µm extent


def test_layouts_never_overwrite(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        gd.datasets.xenium_layout(tmp_path / "full")
    with pytest.raises(FileExistsError, match="is a file"):
        gd.datasets.visium_hd_layout(tmp_path / "full" / "keep.txt")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="mpp must be"):
        gd.datasets.wsi_layout(tmp_path / "w", mpp=0)
    assert not (tmp_path / "w").exists()
