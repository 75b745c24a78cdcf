"""Features from elsewhere: tables of tile embeddings in sopa's and LazySlide's layouts, mapped to spots by position."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import shapely
import torch

import genedml_sd as gd
from genedml_sd._spatial import get_pixel_size, spots_to_pixels
from genedml_sd.datasets._layouts.embeddings import add_lazyslide_features, add_sopa_embeddings
from genedml_sd.encoders import load_encoder

ENCODER = "colour-stats-test"
DIM = 6
PATCH = 80  # px of the demo's ~1.38 µm/px image: about 110 µm, the size of the package's own tiles


class ColourStats(torch.nn.Module):
    """A cheap real image feature: per-channel mean and standard deviation of the normalised tile, (B, 6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def encoder():
    from genedml_sd.encoders import EncoderSpec, _catalogue, register_encoder

    spec = EncoderSpec(name=ENCODER, description="test", builder="custom", embed_dim=DIM, input_px=32)
    register_encoder(spec, builder=lambda spec, pretrained=False: ColourStats(), overwrite=True)
    yield load_encoder(ENCODER, pretrained=False)
    _catalogue._REGISTRY.pop(ENCODER, None)


def _copy(sdata):
    import spatialdata as sd

    return sd.SpatialData(
        images=dict(sdata.images),
        shapes=dict(sdata.shapes),
        tables=copy.deepcopy(dict(sdata.tables)),
        attrs=copy.deepcopy(dict(sdata.attrs)),
    )


def _keys(sdata) -> tuple[str, str]:
    """(image, spots) of a demo section, e.g. ``("C2_he", "C2_spots")``."""
    return next(iter(sdata.images)), next(k for k in sdata.shapes if k.endswith("_spots"))


@pytest.fixture(scope="module")
def sopa_c2(demo, encoder):
    s = _copy(demo[1])
    image, spots = _keys(s)
    key = add_sopa_embeddings(s, encoder, image_key=image, patch_width=PATCH, near_shapes=spots, margin_px=2 * PATCH)
    return s, key


def _containing(sdata, tiles_key, point):
    boxes = sdata[tiles_key].geometry.to_numpy()
    hit = np.flatnonzero(shapely.contains_xy(boxes, point[0], point[1]))
    assert len(hit) == 1, hit
    return int(hit[0])


def _rows_by_position(sdata, tiles_key):
    """Tile row of each top-left corner (x, y), px."""
    b = sdata[tiles_key].geometry.bounds.to_numpy()
    return {(int(x), int(y)): i for i, (x, y) in enumerate(b[:, :2])}


def test_sopa_layout_is_described(sopa_c2):
    s, key = sopa_c2
    assert key == f"{ENCODER}_embeddings"
    info = gd.tl.describe_feature_table(s, key)
    assert (info.source, info.model_name, info.tiles_key, info.dim) == ("sopa", ENCODER, "embeddings_patches", DIM)
    assert info.n_tiles == len(s["embeddings_patches"])
    # the embeddings table is never taken for counts: the spots and their counts table are still inferred
    from genedml_sd.tl._data import resolve_slide_keys

    keys = resolve_slide_keys(s, None, None, None, need_table=True)
    assert (keys.shapes_key, keys.table_key) == (_keys(s)[1], "table")


def test_sopa_table_maps_to_spots_by_position(sopa_c2):
    s, key = sopa_c2
    image, spots = _keys(s)
    feats = gd.tl.table_features(s, key, image_key=image, shapes_key=spots)
    emb = s.tables[key].X
    spots_px = spots_to_pixels(s, spots, image)
    by_pos = _rows_by_position(s, "embeddings_patches")
    assert feats.mode == "table" and feats.n_encoded_tiles == 0
    assert feats.local.shape == (len(s[spots]), DIM) and feats.token_index.shape == (len(s[spots]), 25)
    np.testing.assert_allclose(feats.coords_um, spots_px * get_pixel_size(s, image))
    for i in (0, len(spots_px) // 2, len(spots_px) - 1):
        home = _containing(s, "embeddings_patches", spots_px[i])
        np.testing.assert_array_equal(feats.local[i], emb[home])
        assert feats.token_index[i, 12] == home  # the centre of the 5 x 5 grid is the covering patch
        x0, y0 = (int(v) for v in s["embeddings_patches"].geometry.bounds.to_numpy()[home, :2])
        for t, (dy, dx) in enumerate((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)):
            expected = by_pos.get((x0 + dx * PATCH, y0 + dy * PATCH), len(emb))  # absent: the mean token
            assert feats.token_index[i, t] == expected, (i, t)
    np.testing.assert_allclose(feats.tokens[-1], np.asarray(emb).mean(0), rtol=1e-5)


def test_overlapping_patches_give_the_stride(demo, encoder):
    s = _copy(demo[1])
    image, spots = _keys(s)
    key = add_sopa_embeddings(
        s, encoder, image_key=image, patch_width=PATCH, patch_overlap=PATCH // 2, near_shapes=spots
    )
    feats = gd.tl.table_features(s, key, image_key=image, shapes_key=spots)
    b = s["embeddings_patches"].geometry.bounds.to_numpy()
    home = int(feats.token_index[0, 12])
    right = int(feats.token_index[0, 13])
    assert right < len(b)
    assert b[right, 0] - b[home, 0] == PATCH // 2 and b[right, 1] == b[home, 1]  # one stride (40 px) to the right


def test_lazyslide_layout(demo, encoder):
    s = _copy(demo[1])
    image, spots = _keys(s)
    key = add_lazyslide_features(s, encoder, image_key=image, tile_px=PATCH, near_shapes=spots, model_name="resnet50")
    assert key == "resnet50_tiles"
    info = gd.tl.describe_feature_table(s, key)
    assert (info.source, info.model_name, info.tiles_key) == ("lazyslide", "resnet50", "tiles")
    feats = gd.tl.table_features(s, key, image_key=image, shapes_key=spots, neighbours=False)
    assert feats.tokens is None
    spots_px = spots_to_pixels(s, spots, image)
    home = _containing(s, "tiles", spots_px[3])
    np.testing.assert_array_equal(feats.local[3], s.tables[key].X[home])


def test_fit_and_predict_from_tables(demo, encoder, tmp_path):
    c2, c3 = _copy(demo[1]), _copy(demo[2])
    for s in (c2, c3):
        image, spots = _keys(s)
        add_sopa_embeddings(s, encoder, image_key=image, patch_width=PATCH, near_shapes=spots, margin_px=2 * PATCH)
    key = f"{ENCODER}_embeddings"
    model = gd.tl.fit(
        c2, features_key=key, genes=20, max_epochs=1, val_sections=None, batch_size=128, dim=32, n_heads=4
    )
    assert model.features.mode == "table" and model.encoder.name == f"sopa:{ENCODER}"
    assert model.features.table["embedding_config"]["patch_width"] == PATCH
    gd.tl.predict(c3, model)
    pred = c3.tables["gd_predictions"]
    assert pred.shape == (len(c3[_keys(c3)[1]]), 20) and np.isfinite(pred.X).all()
    assert pred.uns["genedml_sd"]["encoder"] == f"sopa:{ENCODER}"
    # the saved model reads the same kind of table again
    model.save(tmp_path / "m")
    again = gd.tl.predict(c3, gd.tl.TrainedModel.load(tmp_path / "m"), inplace=False)
    np.testing.assert_allclose(again.X, pred.X, atol=1e-5)

    # a table of another model, or an encoder on top of a table, are errors naming what is wrong
    other = _copy(demo[2])
    image, spots = _keys(other)
    add_sopa_embeddings(
        other, encoder, image_key=image, patch_width=PATCH, near_shapes=spots, model_name="uni", key_added=key
    )
    with pytest.raises(ValueError, match=f"'sopa:uni'.*trained on {DIM}-d embeddings of 'sopa:{ENCODER}'"):
        gd.tl.predict(other, model, inplace=False)
    with pytest.raises(ValueError, match="either encoder= .* or features_key="):
        gd.tl.fit(c2, features_key=key, encoder="stain-texture", genes=5, max_epochs=1)
    with pytest.raises(KeyError, match="features_key='nope'"):
        gd.tl.fit(c2, features_key="nope", genes=5, max_epochs=1)
    with pytest.raises(ValueError, match="not trained on a table"):
        plain = gd.tl.fit(c2, encoder=encoder, genes=5, max_epochs=1, val_sections=None, dim=32, n_heads=4)
        gd.tl.predict(c3, plain, features_key=key, inplace=False)


def test_a_spatialdata_subclass_is_accepted(demo, encoder):
    """LazySlide's ``WSIData`` is a SpatialData subclass: fit takes it where it takes a SpatialData."""
    import spatialdata as sd

    class WSILike(sd.SpatialData):
        pass

    base = _copy(demo[1])
    s = WSILike(images=dict(base.images), shapes=dict(base.shapes), tables=dict(base.tables), attrs=dict(base.attrs))
    image, spots = _keys(s)
    key = add_lazyslide_features(s, encoder, image_key=image, tile_px=PATCH, near_shapes=spots)
    model = gd.tl.fit(s, features_key=key, genes=5, max_epochs=1, val_sections=None, dim=32, n_heads=4)
    assert model.features.table["tile_spec"]["width"] == PATCH


def test_cross_validate_from_tables(demo, encoder):
    slides = [_copy(s) for s in demo[:3]]  # B4 (patient B), C2, C3 (patient C)
    for s in slides:
        image, spots = _keys(s)
        add_sopa_embeddings(s, encoder, image_key=image, patch_width=PATCH, near_shapes=spots, margin_px=2 * PATCH)
    res = gd.tl.cross_validate(
        slides, features_key=f"{ENCODER}_embeddings", genes=10, max_epochs=1, val_sections=None, dim=32, n_heads=4
    )
    folds = res[~res["fold"].isin(["mean", "sd"])]
    assert sorted(folds["test_group"]) == ["B", "C"] and np.isfinite(folds["mse"].astype(float)).all()
    assert res.attrs["feature_mode"] == "table" and res.attrs["encoder"] == f"sopa:{ENCODER}"
    assert res.attrs["feature_seconds"] == {}  # nothing was encoded
