"""gd.io.visium on Space Ranger outs/ folders written from real HER2ST pixels and counts (spatialdata-io 0.7.1)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd._spatial import image_levels, spot_radius_px, spots_to_pixels
from genedml_sd.datasets._layouts.her2st import her2st_b4
from genedml_sd.datasets._layouts.tenx import write_pyramid_tiff
from genedml_sd.datasets._layouts.visium import write_visium

LIB = "HER2ST_B4_visium"


@pytest.fixture(scope="module")
def source():
    return her2st_b4()


@pytest.fixture(scope="module")
def cytassist(source, tmp_path_factory):
    """Space Ranger 3-like: plain outs/ (no prefix), spot_diameter_fullres 27 % larger than the 55 µm spot."""
    return write_visium(tmp_path_factory.mktemp("sr3") / "sample_1", source, spot_diameter_factor=1.27)


@pytest.fixture(scope="module")
def sdata_full(cytassist):
    with pytest.warns(UserWarning, match=r"21% apart\); using the lattice"):
        return gd.io.visium(cytassist.outs, fullres_image_file=cytassist.fullres, patient="B", section="B4")


def test_plain_outs_folder_gets_its_dataset_id_from_the_h5(cytassist, caplog):
    """Regression: the original reader failed with "Cannot determine the library_id" on a plain outs/ folder."""
    import spatialdata_io

    with pytest.raises(ValueError, match="Cannot determine the `library_id`"):
        spatialdata_io.visium(cytassist.outs)  # what the original gd.io.visium called
    caplog.set_level(logging.INFO, logger="genedml_sd")
    with pytest.warns(UserWarning, match="lattice"):
        s = gd.io.visium(cytassist.outs.parent)  # the folder holding outs/ works too
    assert set(s.images) == {f"{LIB}_he"} and set(s.shapes) == {f"{LIB}_spots"} and set(s.tables) == {"table"}
    assert f"Dataset id {LIB!r} from the 'library_ids' attribute" in caplog.text


def test_pixel_size_comes_from_the_spot_lattice(cytassist, sdata_full):
    """Regression: µm/px came from spot_diameter_fullres (21 % off on Space Ranger 3 CytAssist output)."""
    truth = cytassist.um_per_px
    naive = 55.0 / cytassist.extra["scalefactors"]["spot_diameter_fullres"]  # what the original reader recorded
    assert abs(naive / truth - 1) > 0.2
    got = gd.io.get_pixel_size(sdata_full, f"{LIB}_he")
    assert got == pytest.approx(truth, rel=1e-2)
    print(
        f"Visium fullres µm/px: {got:.5f} vs {truth:.5f} ({got / truth - 1:+.2e}); spot_diameter_fullres: {naive:.4f}"
    )
    info = sdata_full.tables["table"].uns["genedml_sd"]
    assert info["um_per_px_scalefactors"] == pytest.approx(naive)
    assert (info["observation"], info["observation_um"], info["platform"]) == ("spot", 55.0, "visium")
    assert (info["patient"], info["section"], info["image_source"]) == ("B", "B4", "fullres")
    radius = spot_radius_px(sdata_full, f"{LIB}_spots", f"{LIB}_he")
    np.testing.assert_allclose(2 * radius * got, 55.0)  # the true spot size, not spot_diameter_fullres


def test_fullres_image_spots_and_counts(cytassist, sdata_full, source):
    s, key = sdata_full, f"{LIB}_he"
    levels = image_levels(s[key])
    assert [lv.shape[1:] for lv in levels] == [(3072, 3793), (1536, 1896), (768, 948)]  # the TIFF's own levels
    assert levels[0].data.chunksize == (3, 512, 512)
    table = s.tables["table"]
    pos = cytassist.positions
    tissue = pos[pos.in_tissue == 1]
    assert table.n_obs == len(tissue) == len(cytassist.counts) and list(table.var_names) == cytassist.genes
    row = 123
    barcode = table.obs["barcode"].iloc[row]
    xy = spots_to_pixels(s, f"{LIB}_spots", key)[row]
    np.testing.assert_allclose(xy, pos.loc[barcode, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    assert table.obs.loc[barcode, "array_row"] == pos.loc[barcode, "array_row"]
    truth = cytassist.counts[list(tissue.index).index(barcode)]
    assert table.X.dtype == np.int32 and table.X.format == "csr"
    np.testing.assert_array_equal(table.X[row].toarray().ravel(), truth)
    x, y = np.round(xy).astype(int)
    np.testing.assert_array_equal(
        levels[0][:, y - 20 : y + 20, x - 20 : x + 20].values.transpose(1, 2, 0),
        source.image[y - 20 : y + 20, x - 20 : x + 20],
    )


@pytest.fixture(scope="module")
def sdata_hires(cytassist):
    with pytest.warns(UserWarning, match="lattice"):
        return gd.io.visium(cytassist.outs, dataset_id="S1")


def test_without_fullres_the_hires_image_has_the_right_pixel_size(cytassist, sdata_hires):
    s = sdata_hires
    scalef = cytassist.hires_scalef
    assert gd.io.get_pixel_size(s, "S1_he") == pytest.approx(cytassist.um_per_px / scalef, rel=1e-2)
    hires = image_levels(s["S1_he"])[0]
    assert hires.shape[1:] == (round(3072 * scalef), 2000)
    xy_full = spots_to_pixels(s, "S1_spots", "S1_he", level=0) / scalef  # hires px -> fullres px
    pos = cytassist.positions
    barcodes = s.tables["table"].obs["barcode"]
    np.testing.assert_allclose(xy_full, pos.loc[barcodes, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    radius = spot_radius_px(s, "S1_spots", "S1_he")
    np.testing.assert_allclose(2 * radius * gd.io.get_pixel_size(s, "S1_he"), 55.0)


def test_spaceranger1_positions_prefixed_counts_and_folder_name(source, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="genedml_sd")
    t = write_visium(tmp_path / "a", source, spaceranger=1, library_id=None, counts_prefix="LIB7", fullres=False)
    assert (t.outs / "spatial" / "tissue_positions_list.csv").exists()
    s = gd.io.visium(t.outs)  # spot_diameter_fullres is right here: no warning expected
    assert "LIB7_spots" in s.shapes and "from the counts file name" in caplog.text
    assert gd.io.get_pixel_size(s, "LIB7_he") == pytest.approx(t.um_per_px / t.hires_scalef, rel=1e-2)
    np.testing.assert_array_equal(s.tables["table"].X.toarray(), t.counts)

    t2 = write_visium(tmp_path / "case_42", source, library_id=None, fullres=False)
    (t2.outs / "spatial" / "tissue_hires_image.png").unlink()
    caplog.clear()
    s2 = gd.io.visium(t2.outs)
    assert "case_42_he" in s2.images and "from the folder name" in caplog.text
    assert "has no tissue_hires_image.png; using the lowres image" in caplog.text
    assert gd.io.get_pixel_size(s2, "case_42_he") == pytest.approx(t2.um_per_px / t2.lowres_scalef, rel=1e-2)
    assert s2.tables["table"].uns["genedml_sd"]["image_source"] == "lowres"


def test_clear_errors(cytassist, source, tmp_path):
    broken = tmp_path / "outs"
    shutil.copytree(cytassist.outs, broken)
    write_pyramid_tiff(tmp_path / "small.tif", source.image[:500, :500], n_sub=0)
    with pytest.raises(ValueError, match=r"spots lie outside .*small\.tif"), pytest.warns(UserWarning, match="lattice"):
        gd.io.visium(broken, fullres_image_file=tmp_path / "small.tif")
    (broken / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json\.json does not exist"):
        gd.io.visium(broken)
    (broken / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions"):
        gd.io.visium(broken)
    (broken / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match="No counts matrix 'filtered_feature_bc_matrix.h5'"):
        gd.io.visium(broken)


def test_zarr_round_trip(sdata_hires, tmp_path):
    import spatialdata as sd

    sdata_hires.write(tmp_path / "v.zarr")
    back = sd.read_zarr(tmp_path / "v.zarr")
    assert gd.io.get_pixel_size(back, "S1_he") == gd.io.get_pixel_size(sdata_hires, "S1_he")
    assert back.tables["table"].uns["genedml_sd"] == sdata_hires.tables["table"].uns["genedml_sd"]
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), sdata_hires.tables["table"].X.toarray())
    np.testing.assert_array_equal(image_levels(back["S1_he"])[1].values, image_levels(sdata_hires["S1_he"])[1].values)
