from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import genedml_sd as gd
from genedml_sd._spatial import spots_to_pixels


def test_her2st_b4_structure(b4, her2st_root, her2st_index):
    from spatialdata.models import TableModel, get_table_keys

    assert set(b4.images) == {"B4_he"} and set(b4.shapes) == {"B4_spots"} and set(b4.tables) == {"table"}
    table = b4.tables["table"]
    TableModel().validate(table)
    assert get_table_keys(table) == ("B4_spots", "region", "spot_id")
    assert table.n_obs == her2st_index.loc["B4", "n_spots_both"] == 283
    assert "ERBB2" in table.var_names and table.var_names.is_unique
    assert np.issubdtype(table.X.dtype, np.integer)
    assert set(table.obs["patient"]) == {"B"} and set(table.obs["section"]) == {"B4"}
    assert table.uns["genedml_sd"]["patient"] == "B"
    # a pyramid whose coarsest level is small
    levels = list(b4["B4_he"].children)
    assert len(levels) >= 4 and b4["B4_he"][levels[-1]]["image"].sizes["x"] < 1200


def test_her2st_pixel_size_from_lattice(b4, her2st_index):
    # derived from the 200 µm spot lattice, not read from sections.csv
    assert gd.io.get_pixel_size(b4, "B4_he") == pytest.approx(her2st_index.loc["B4", "um_per_px_image"], rel=3e-3)
    radius_px = b4["B4_spots"]["radius"].iloc[0]
    assert 2 * radius_px == pytest.approx(her2st_index.loc["B4", "spot_diameter_px_image"], rel=5e-3)


def test_her2st_known_spot_position(b4, her2st_root):
    sel = pd.read_csv(her2st_root / "ST-spotfiles" / "B4_selection.tsv", sep="\t")
    sel.index = sel.x.astype(str) + "x" + sel.y.astype(str)
    table = b4.tables["table"]
    spot = table.obs.iloc[17]
    expected = sel.loc[spot["barcode"], ["pixel_x", "pixel_y"]].to_numpy(float)
    got = spots_to_pixels(b4, "B4_spots", "B4_he")[int(spot["spot_id"])]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # counts joined on the spot id, not on row order
    counts = pd.read_csv(her2st_root / "ST-cnts" / "B4.tsv.gz", sep="\t", index_col=0)
    j = table.var_names.get_loc("ERBB2")
    assert table.X[17, j] == counts.loc[spot["barcode"], "ERBB2"]


def test_her2st_a1_downscaled_image_uses_transformation(her2st_root, her2st_index):
    a1 = gd.io.her2st(her2st_root, "A1")
    assert gd.io.get_pixel_size(a1, "A1_he") == pytest.approx(3.19, rel=5e-3)
    sel = pd.read_csv(her2st_root / "ST-spotfiles" / "A1_selection.tsv", sep="\t")
    sel.index = sel.x.astype(str) + "x" + sel.y.astype(str)
    barcode = a1.tables["table"].obs["barcode"].iloc[0]
    px = spots_to_pixels(a1, "A1_spots", "A1_he")[0]
    scale = her2st_index.loc["A1", ["coord_to_image_scale_x", "coord_to_image_scale_y"]].to_numpy(float)
    np.testing.assert_allclose(px, sel.loc[barcode, ["pixel_x", "pixel_y"]].to_numpy(float) * scale, rtol=1e-5)


def test_zarr_round_trip_keeps_pixel_size(b4, tmp_path):
    import spatialdata as sd
    from spatialdata.testing import assert_spatial_data_objects_are_identical

    path = tmp_path / "b4.zarr"
    b4.write(path)
    back = sd.read_zarr(path)
    assert gd.io.get_pixel_size(back, "B4_he") == gd.io.get_pixel_size(b4, "B4_he")
    assert_spatial_data_objects_are_identical(b4, back)
    assert back.tables["table"].uns["genedml_sd"]["patient"] == "B"


def test_pixel_size_errors(b4):
    import spatialdata as sd

    bare = sd.SpatialData(images={"he": b4["B4_he"]})
    with pytest.raises(KeyError, match="'he' has no recorded pixel size"):
        gd.io.get_pixel_size(bare, "he")
    with pytest.raises(KeyError, match="image_key='nope'"):
        gd.io.get_pixel_size(bare, "nope")
    with pytest.raises(ValueError, match="positive"):
        gd.io.set_pixel_size(bare, "he", -1)
    gd.io.set_pixel_size(bare, "he", 0.5)
    assert gd.io.get_pixel_size(bare, "he") == 0.5


def _small_st(tmp_path, rng):
    """A tiny legacy-ST folder: 3x3 lattice, 20 px per 200 µm step, 100 x 100 px image."""
    from PIL import Image

    xs, ys = np.meshgrid(np.arange(3), np.arange(3))
    sel = pd.DataFrame({"x": xs.ravel() + 5, "y": ys.ravel() + 7})
    sel["new_x"], sel["new_y"] = sel.x.astype(float), sel.y.astype(float)
    sel["pixel_x"], sel["pixel_y"] = 30 + 20 * (sel.x - 5), 30 + 20 * (sel.y - 7)
    sel["selected"] = 1
    counts = pd.DataFrame(rng.poisson(3, (9, 4)), index=sel.x.astype(str) + "x" + sel.y.astype(str))
    counts.columns = ["G1", "G2", "G3", "G4"]
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    return sel, counts


def test_legacy_st_generic_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    sel, counts = _small_st(tmp_path, rng)
    sel.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    counts.iloc[::-1].to_csv(tmp_path / "counts.tsv", sep="\t")  # reversed order: join must use ids
    s = gd.io.legacy_st(tmp_path / "counts.tsv", tmp_path / "spots.tsv", tmp_path / "img.png", sample_id="S1")
    assert gd.io.get_pixel_size(s, "S1_he") == pytest.approx(10.0)  # 200 µm / 20 px
    assert s["S1_spots"]["radius"].iloc[0] == pytest.approx(5.0)  # 50 µm / 10 µm/px
    t = s.tables["table"]
    row = list(t.obs["barcode"]).index("6x8")
    assert t.X[row].toarray().ravel().tolist() == counts.loc["6x8"].tolist()

    bad = counts.astype(float)
    bad.iloc[2, 1] = np.nan
    bad.to_csv(tmp_path / "nan.tsv", sep="\t")
    with pytest.raises(ValueError, match="NaN"):
        gd.io.legacy_st(tmp_path / "nan.tsv", tmp_path / "spots.tsv", tmp_path / "img.png", sample_id="S1")
    far = sel.copy()
    far["pixel_x"] += 500
    far.to_csv(tmp_path / "far.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="outside the image"):
        gd.io.legacy_st(tmp_path / "counts.tsv", tmp_path / "far.tsv", tmp_path / "img.png", sample_id="S1")
    sel.drop(columns="pixel_y").to_csv(tmp_path / "nocol.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="pixel_y"):
        gd.io.legacy_st(tmp_path / "counts.tsv", tmp_path / "nocol.tsv", tmp_path / "img.png", sample_id="S1")


def test_her2st_unknown_section(her2st_root):
    with pytest.raises(KeyError, match="Z9"):
        gd.io.her2st(her2st_root, "Z9")


def write_hest_sample(root, sdata, sample_id: str) -> dict:
    """Write a SpatialData section in HEST-1k's layout: pyramidal TIFF, h5ad, metadata JSON."""
    import anndata as ad
    import tifffile

    image_key = next(iter(sdata.images))
    levels = [sdata[image_key][k]["image"].values.transpose(1, 2, 0) for k in sorted(sdata[image_key].children)]
    for sub in ("wsis", "st", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif", bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), photometric="rgb", compression="zlib")
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    table = sdata.tables["table"]
    xy = spots_to_pixels(sdata, next(iter(sdata.shapes)), image_key)
    adata = ad.AnnData(X=sp.csr_matrix(table.X), obs=pd.DataFrame(index=table.obs["barcode"].astype(str).to_numpy()))
    adata.var_names = table.var_names
    adata.obsm["spatial"] = xy
    adata.obs["array_col"] = table.obs["array_col"].to_numpy()
    adata.obs["array_row"] = table.obs["array_row"].to_numpy()
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    meta = {
        "pixel_size_um_estimated": gd.io.get_pixel_size(sdata, image_key),
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "st_technology": "Spatial Transcriptomics",
        "patient": "Patient C",
        "organ": "Breast",
    }
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    return meta


def test_hest_reader_on_real_section_written_in_hest_layout(demo, tmp_path):
    c2 = demo[1]
    meta = write_hest_sample(tmp_path, c2, "HER2ST_C2")
    s = gd.io.hest(tmp_path, "HER2ST_C2")
    assert gd.io.get_pixel_size(s, "HER2ST_C2_he") == pytest.approx(meta["pixel_size_um_estimated"])
    img = s["HER2ST_C2_he"]["scale0"]["image"]
    orig = c2["C2_he"]["scale0"]["image"]
    assert img.shape == orig.shape
    np.testing.assert_array_equal(img[:, 1000:1010, 700:720].values, orig[:, 1000:1010, 700:720].values)
    t = s.tables["table"]
    assert t.n_obs == c2.tables["table"].n_obs and (t.var_names == c2.tables["table"].var_names).all()
    np.testing.assert_array_equal(t.X.toarray(), c2.tables["table"].X.toarray())
    assert set(t.obs["patient"]) == {"Patient C"}
    radius = s["HER2ST_C2_spots"]["radius"].iloc[0]
    assert 2 * radius * meta["pixel_size_um_estimated"] == pytest.approx(100.0)
    with pytest.raises(FileNotFoundError, match="HEST sample .MISSING.: st file"):
        gd.io.hest(tmp_path, "MISSING")
    # the lazy slide survives pickling (DataLoader workers, dask processes) and reads the same pixels
    import pickle

    again = pickle.loads(pickle.dumps(img.data))
    np.testing.assert_array_equal(again[:, 1000:1010, 700:720].compute(), orig[:, 1000:1010, 700:720].values)


def test_visium_pixel_size_from_spot_diameter(b4):
    """µm/px of every image follows from the spot diameter and the images' transformations."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, set_transformation

    hires = Image2DModel.parse(np.zeros((3, 200, 200), np.uint8), dims=("c", "y", "x"))
    set_transformation(hires, Scale([4.0, 4.0], axes=("x", "y")), "global")
    s = sd.SpatialData(images={"full": b4["B4_he"], "hires": hires}, shapes={"spots": b4["B4_spots"]})
    radius = float(b4["B4_spots"]["radius"].iloc[0])
    sizes = gd.io.estimate_pixel_size(s, "spots", spot_diameter_um=100.0)
    assert sizes["full"] == pytest.approx(100.0 / (2 * radius))
    assert sizes["hires"] == pytest.approx(4 * sizes["full"])
    assert gd.io.get_pixel_size(s, "hires") == sizes["hires"]


def test_legacy_st_records_the_observation_kind_and_size(b4):
    info = b4.tables["table"].uns["genedml_sd"]
    assert (info["platform"], info["observation"], info["observation_um"]) == ("legacy_st", "spot", 100.0)
