"""gd.io.visium_hd on a Space Ranger HD outs/ folder written from real HER2ST pixels and counts (spatialdata-io 0.7.1)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

import genedml_sd as gd
from genedml_sd._spatial import affine_to_pixels, image_levels
from genedml_sd.datasets._layouts.her2st import her2st_b4
from genedml_sd.datasets._layouts.visium_hd import ANGLE_DEG, CROP_PX, write_visium_hd

LIB = "HER2ST_B4_hd"


@pytest.fixture(scope="module")
def source():
    return her2st_b4()


@pytest.fixture(scope="module")
def layout(source, tmp_path_factory):
    return write_visium_hd(tmp_path_factory.mktemp("hd") / "hd_sample", source)


@pytest.fixture(scope="module")
def bins8(layout):
    return gd.io.visium_hd(layout.outs, bin_size=8, fullres_image_file=layout.fullres, patient="B")


def test_8um_bins_are_squares_of_their_true_size(layout, bins8):
    key = f"{LIB}_square_008um"
    assert set(bins8.shapes) == {key} and set(bins8.images) == {f"{LIB}_he"}
    um = gd.io.get_pixel_size(bins8, f"{LIB}_he")
    assert um == layout.um_per_px  # microns_per_pixel of the scale factors
    shapes = bins8[key]
    assert set(shapes.geometry.geom_type) == {"Polygon"}
    side_px = 8.0 / um
    np.testing.assert_allclose(shapes.geometry.area.to_numpy(), side_px**2, rtol=1e-9)
    ring = np.asarray(shapes.geometry.iloc[0].exterior.coords)
    edges = np.diff(ring, axis=0)
    np.testing.assert_allclose(np.linalg.norm(edges, axis=1), side_px, rtol=1e-9)
    assert math.degrees(math.atan2(edges[0, 1], edges[0, 0])) == pytest.approx(ANGLE_DEG, abs=1e-6)  # along the array
    table = bins8.tables["table"]
    truth = layout.bins[8]
    centres = np.column_stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y])
    expected = truth.loc[table.obs["barcode"], ["x", "y"]].to_numpy()
    np.testing.assert_allclose(centres, expected, atol=1e-6)
    info = table.uns["genedml_sd"]
    assert (info["platform"], info["observation"], info["observation_um"], info["patient"]) == (
        "visium_hd",
        "bin",
        8.0,
        "B",
    )
    assert info["um_per_px_lattice"] == pytest.approx(um, rel=1e-6)


def test_8um_counts_are_sparse_and_add_up_to_the_spots(layout, bins8, source):
    table = bins8.tables["table"]
    assert table.X.format == "csr" and table.X.dtype == np.int32
    assert table.X.nnz == np.count_nonzero(layout.counts[8])
    np.testing.assert_array_equal(table.X.toarray(), layout.counts[8])
    assert list(table.var_names) == source.genes
    truth = layout.bins[8]
    spot_of_row = truth.loc[table.obs["barcode"], "spot"].to_numpy()
    # spots far enough from the crop's edge have all their bins in the image
    um = layout.um_per_px
    centres = source.spots_xy - np.array(layout.crop_origin)
    centres = centres[((centres >= 0) & (centres < CROP_PX)).all(axis=1)]
    inner = np.flatnonzero(((centres > 60 / um) & (centres < CROP_PX - 60 / um)).all(axis=1))
    assert len(inner) >= 20
    for s in inner:
        summed = np.asarray(table.X[spot_of_row == s].sum(axis=0)).ravel()
        np.testing.assert_array_equal(summed, layout.spot_counts[s])


def test_fullres_window_is_the_microscope_image(layout, bins8, source):
    lv = image_levels(bins8[f"{LIB}_he"])[0]
    assert lv.shape[1:] == (CROP_PX, CROP_PX)
    x0, y0 = layout.crop_origin
    np.testing.assert_array_equal(
        lv[:, 300:524, 400:624].values.transpose(1, 2, 0), source.image[y0 + 300 : y0 + 524, x0 + 400 : x0 + 624]
    )


def test_16um_bins_on_the_hires_image(layout):
    s = gd.io.visium_hd(layout.outs.parent, bin_size=16)
    key, image_key = f"{LIB}_square_016um", f"{LIB}_he"
    um_hires = layout.um_per_px / layout.hires_scalef
    assert gd.io.get_pixel_size(s, image_key) == pytest.approx(um_hires, rel=1e-9)
    assert s.tables["table"].uns["genedml_sd"]["image_source"] == "hires"
    m = affine_to_pixels(s, key, image_key)  # full-resolution px -> hires px
    np.testing.assert_allclose(m[:2, :2], np.eye(2) * layout.hires_scalef)
    area_um2 = s[key].geometry.area.to_numpy() * layout.um_per_px**2
    np.testing.assert_allclose(area_um2, 16.0**2, rtol=1e-9)
    np.testing.assert_array_equal(s.tables["table"].X.toarray(), layout.counts[16])


def test_missing_bin_size_lists_those_present(layout):
    with pytest.raises(ValueError, match=r"Bin size 2 µm .*\['square_008um', 'square_016um'\].*\[8, 16\]"):
        gd.io.visium_hd(layout.outs, bin_size=2)


def test_bins_that_do_not_match_the_scale_factors(layout, tmp_path):
    outs = tmp_path / "outs"
    shutil.copytree(layout.outs, outs)
    sf_file = outs / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_file.read_text())
    sf_file.write_text(json.dumps({**sf, "bin_size_um": 8.0}))
    with pytest.raises(ValueError, match=r"square_016um.*scalefactors_json\.json says bin_size_um = 8"):
        gd.io.visium_hd(outs, bin_size=16)
    sf_file.write_text(json.dumps({**sf, "spot_diameter_fullres": sf["spot_diameter_fullres"] * 1.3}))
    with pytest.raises(ValueError, match="does not match the scale factors"):
        gd.io.visium_hd(outs, bin_size=16)
    # consistent scale factors, but the bins are laid out 25 % wider than 16 µm at microns_per_pixel
    sf_file.write_text(json.dumps(sf))
    pos_file = sf_file.parent / "tissue_positions.parquet"
    pos = pd.read_parquet(pos_file)
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] *= 1.25
    pos.to_parquet(pos_file, index=False)
    with pytest.raises(ValueError, match=r"16 µm bins .* the bins' size does not match the scale factors"):
        gd.io.visium_hd(outs, bin_size=16)
    (outs / "feature_slice.h5").unlink()
    with pytest.raises(FileNotFoundError, match="feature_slice.h5"):
        gd.io.visium_hd(outs, bin_size=8)
