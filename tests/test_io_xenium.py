"""gd.io.xenium on a Xenium 2.x output folder + aligned H&E written from a real HER2ST section (spatialdata-io 0.7.1)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd._spatial import image_levels, spot_radius_px, spots_to_pixels
from genedml_sd.datasets._layouts.her2st import her2st_b4
from genedml_sd.datasets._layouts.xenium import PIXEL_SIZE, write_xenium

ID = "HER2ST_B4_region"


@pytest.fixture(scope="module")
def source():
    return her2st_b4()


@pytest.fixture(scope="module")
def layout(source, tmp_path_factory):
    return write_xenium(tmp_path_factory.mktemp("xenium") / "outs", source)


@pytest.fixture(scope="module")
def cells(layout):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. spatialdata-io's "cell_id ... does not match"
        return gd.io.xenium(layout.root, patient="B", section="B4")


def test_structure_and_metadata(cells, layout):
    assert set(cells.images) == {f"{ID}_he"} and set(cells.tables) == {"table"}
    assert set(cells.shapes) == {f"{ID}_cells"}  # the only shapes: functions infer it
    info = cells.tables["table"].uns["genedml_sd"]
    diameters = 2 * np.sqrt(layout.cells["cell_area"].to_numpy() / np.pi)
    assert (info["platform"], info["observation"], info["patient"], info["section"]) == ("xenium", "cell", "B", "B4")
    assert info["observation_um"] == pytest.approx(np.median(diameters), rel=1e-4)
    assert info["shapes_key"] == f"{ID}_cells" and info["pixel_size_um"] == PIXEL_SIZE


def test_he_pixel_size_from_the_alignment(cells, layout):
    um = gd.io.get_pixel_size(cells, f"{ID}_he")
    assert um == pytest.approx(layout.he_um_per_px, rel=1e-9)
    print(f"Xenium H&E µm/px from the alignment: {um:.6f} (written {layout.he_um_per_px:.6f})")
    levels = image_levels(cells[f"{ID}_he"])
    assert [lv.shape[1:] for lv in levels] == [(640, 640), (320, 320)]
    np.testing.assert_array_equal(levels[0][:, 100:324, 200:424].values.transpose(1, 2, 0), layout.he[100:324, 200:424])


def test_cells_sit_where_they_were_placed_on_the_he(cells, layout):
    table = cells.tables["table"]
    assert list(table.obs["cell_id"]) == list(layout.cells["cell_id"])
    xy = spots_to_pixels(cells, f"{ID}_cells", f"{ID}_he")
    np.testing.assert_allclose(xy, layout.cells[["he_x", "he_y"]].to_numpy(), atol=1e-6)
    radius_um = np.sqrt(layout.cells["cell_area"].to_numpy() / np.pi)
    np.testing.assert_allclose(cells[f"{ID}_cells"]["radius"].to_numpy(), radius_um, rtol=1e-4)
    np.testing.assert_allclose(
        spot_radius_px(cells, f"{ID}_cells", f"{ID}_he"), radius_um / layout.he_um_per_px, rtol=1e-4
    )


def test_counts_are_the_gene_counts(cells, layout, source):
    table = cells.tables["table"]
    assert list(table.var_names) == source.genes  # negative control probes dropped
    assert table.X.format == "csr" and table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), layout.counts)


def test_he_without_alignment_is_a_clear_error(layout, tmp_path):
    root = tmp_path / "x"
    shutil.copytree(layout.root, root)
    (root / layout.alignment_file.name).unlink()
    with pytest.raises(ValueError, match=r"HER2ST_B4_he_image\.ome\.tif has no alignment.*he_imagealignment\.csv"):
        gd.io.xenium(root)
    s = gd.io.xenium(root, alignment=layout.alignment)  # the matrix itself
    np.testing.assert_allclose(
        spots_to_pixels(s, f"{ID}_cells", f"{ID}_he"), layout.cells[["he_x", "he_y"]].to_numpy(), atol=1e-6
    )
    with pytest.warns(UserWarning, match=r"records 1.376 µm/px .*23% apart\); using the alignment"):
        gd.io.xenium(root, alignment=layout.alignment @ np.diag([1.3, 1.3, 1.0]))
    with pytest.raises(ValueError, match="not an invertible affine"):
        gd.io.xenium(root, alignment=np.ones((3, 3)))
    (root / layout.he_image.name).unlink()
    with pytest.raises(FileNotFoundError, match=r"0 post-stained H&E files .*not an H&E"):
        gd.io.xenium(root)


def test_elements_asked_for_are_kept(layout):
    from spatialdata.models import get_table_keys

    s = gd.io.xenium(layout.root, boundaries=True, nucleus_boundaries=True, morphology_focus=True, cells_labels=True)
    assert {"morphology_focus", "cell_labels"} <= set(s.images) | set(s.labels)
    assert {f"{ID}_cell_boundaries", f"{ID}_nucleus_boundaries"} <= set(s.shapes)
    poly = s[f"{ID}_cell_boundaries"].geometry.area.to_numpy()  # µm²: the areas the circles have
    np.testing.assert_allclose(np.pi * s[f"{ID}_cells"]["radius"].to_numpy() ** 2, poly, rtol=1e-9)
    assert get_table_keys(s.tables["table"])[:2] == (f"{ID}_cells", "region")
    with pytest.raises(KeyError, match="Pass image_key"):
        gd.io.get_pixel_size(s, None)  # two images now: the H&E must be named
    assert s.tables["table"].uns["genedml_sd"]["image_key"] == f"{ID}_he"
