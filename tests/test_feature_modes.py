"""feature_mode="auto" and the dense mode through gd.tl: the choice, training and prediction on bins."""

from __future__ import annotations

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd.tiling import TileGeometry
from genedml_sd.tl import choose_feature_mode

SMALL = {"dim": 32, "n_heads": 4, "gene_hidden": 32, "group_dim": 8, "k": 4}


@pytest.fixture(scope="module")
def hd_bins(tmp_path_factory):
    outs = gd.datasets.visium_hd_layout(tmp_path_factory.mktemp("hd"))
    return gd.io.visium_hd(outs, bin_size=8, fullres_image_file=outs.parent / "microscope.tif")


def _slide(sdata):
    return [(sdata, next(iter(sdata.images)), next(iter(sdata.shapes)))]


def test_auto_picks_lattice_for_neighbour_methods_and_spot_for_local_ones_on_legacy_st(demo):
    demo = demo[0]
    mode, calls = choose_feature_mode("auto", _slide(demo), TileGeometry(), neighbours=True)
    n = calls["observations"]
    assert mode == "lattice" and n == len(demo[next(iter(demo.shapes))])
    assert calls["spot"] == 25 * n and calls["dense"] < calls["lattice"] < calls["spot"]
    assert calls["dense"] > 0.5 * n  # 200 µm spots do not share 112 µm tiles: not dense
    mode, calls = choose_feature_mode("auto", _slide(demo), TileGeometry(), neighbours=False)
    assert mode == "spot" and calls["spot"] == n
    # an explicit mode is kept; a wrong one names the choices
    assert choose_feature_mode("spot", _slide(demo), TileGeometry(), neighbours=True) == ("spot", {})
    with pytest.raises(ValueError, match="'auto' or one of"):
        choose_feature_mode("tokens", _slide(demo), TileGeometry(), neighbours=True)


def test_auto_picks_dense_for_8um_bins_and_the_model_trains_and_predicts_on_them(hd_bins, tmp_path):
    bins = "HER2ST_B4_hd_square_008um"
    mode, calls = choose_feature_mode("auto", _slide(hd_bins), TileGeometry(), neighbours=True)
    n = len(hd_bins[bins])
    assert mode == "dense" and calls["observations"] == n
    assert calls["dense"] <= 0.05 * n  # the goal: <= 0.05 encoder calls per 8 µm bin

    table = hd_bins.tables["table"]
    genes = list(table.var_names[np.argsort(-np.asarray(table.X.sum(0)).ravel())[:20]])  # 8 µm bins are sparse
    model = gd.tl.fit(
        hd_bins, genes=genes, encoder="stain-texture", max_epochs=1, batch_size=128, cache_dir=str(tmp_path), **SMALL
    )
    assert model.features.mode == "dense"
    assert model.training["feature_mode_calls"]["dense"] == calls["dense"]

    gd.tl.predict(hd_bins, model, cache_dir=str(tmp_path), overview_px=None)
    table = hd_bins.tables["gd_predictions"]
    assert table.shape == (n, 20) and table.X.dtype == np.float32 and np.isfinite(table.X).all()
    assert table.uns["genedml_sd"]["feature_mode"] == "dense"

    # the token grid path predicts what the gathered (N, 25, D) tensor gives
    feats = model.features.extract(
        hd_bins, model.encoder.load(), image_key="HER2ST_B4_hd_he", shapes_key=bins, cache_dir=str(tmp_path)
    )
    assert feats.neighbour is None and feats.tokens.shape[0] == feats.n_encoded_tiles
    dense_nb = feats.tokens[feats.token_index]
    ref = model.module.predict_slide(feats.local, feats.coords_um, dense_nb, batch_size=512).numpy()
    np.testing.assert_allclose(table.X, ref, rtol=1e-5, atol=1e-5)
