"""Observations of any shape: circles (spots), squares (bins) and polygons (cells) are tiled at their centroid."""

from __future__ import annotations

import numpy as np
import pytest

import genedml_sd as gd


def _as_squares(sdata, shapes_key: str, new_key: str):
    """The same spots as axis-aligned squares of side 2 r, with their table re-linked to the squares."""
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    spots = sdata[shapes_key]
    x, y, r = spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy(), spots["radius"].to_numpy()
    boxes = shapely.box(x - r, y - r, x + r, y + r)
    squares = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=boxes, index=spots.index.copy()),
        transformations=get_transformation(spots, get_all=True),
    )
    table = sdata.tables["table"].copy()
    table.obs["region"] = new_key
    table.obs["region"] = table.obs["region"].astype("category")
    del table.uns["spatialdata_attrs"]
    table = TableModel.parse(table, region=new_key, region_key="region", instance_key="spot_id")
    image_key = next(iter(sdata.images))
    return sd.SpatialData(
        images={image_key: sdata[image_key]},
        shapes={new_key: squares},
        tables={"table": table},
        attrs=dict(sdata.attrs),
    )


def test_square_observations_give_the_tiles_of_the_circles_they_replace(demo):
    from genedml_sd._spatial import observation_radii, spots_to_pixels
    from genedml_sd.tiling import SpotTiler

    b4 = demo[0]
    sq = _as_squares(b4, "B4_spots", "bins")
    np.testing.assert_allclose(spots_to_pixels(sq, "bins", "B4_he"), spots_to_pixels(b4, "B4_spots", "B4_he"))
    r = b4["B4_spots"]["radius"].to_numpy()
    np.testing.assert_allclose(observation_radii(sq["bins"]), 2 * r / np.sqrt(np.pi))  # equal-area radius
    a = SpotTiler(b4, shapes_key="B4_spots").local_tiles([0, 5, 100])
    b = SpotTiler(sq, shapes_key="bins").local_tiles([0, 5, 100])
    np.testing.assert_array_equal(a, b)


def test_fit_predict_evaluate_on_square_observations(demo):
    _, c2, c3, c4 = demo
    train = [_as_squares(c2, "C2_spots", "C2_bins"), _as_squares(c3, "C3_spots", "C3_bins")]
    model = gd.tl.fit(train, genes=20, encoder="stain-texture", method="ridge", val_sections=None)
    test = _as_squares(c4, "C4_spots", "C4_bins")
    gd.tl.predict(test, model)
    ev = gd.tl.evaluate(test)
    # the same model on the circles it replaced gives the same predictions (tiles are centred identically)
    circles = gd.tl.predict(c4, model, inplace=False)
    np.testing.assert_allclose(test.tables["gd_predictions"].X, circles.X, atol=1e-5)
    assert ev.summary["n_spots"] == c4["C4_spots"].shape[0] and np.isfinite(ev.summary["pcc_a"])


def test_lines_are_not_observations(demo):
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import LineString

    from genedml_sd._spatial import check_observations

    lines = gpd.GeoDataFrame(geometry=[LineString([(0, 0), (1, 1)])])
    with pytest.raises(ValueError, match="'roads' must hold observations"):
        check_observations(lines, "roads")
    points = gpd.GeoDataFrame(geometry=gpd.points_from_xy([0.0], [1.0]))
    with pytest.raises(ValueError, match="'dots' must hold observations"):
        check_observations(points, "dots")  # points without a radius
    assert sd is not None
