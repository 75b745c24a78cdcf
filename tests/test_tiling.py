from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd.tiling import SpotTiler, TileGeometry, choose_level, tile_loader

from .conftest import coordinate_image, decode_coordinates


def make_sdata(image_levels, spots_xy, *, um_per_px, radius=5.0, image_tf=None, shapes_tf=None):
    """SpatialData with a custom multiscale image (one array per level) and circle spots."""
    import dask.array
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity

    factors = [2] * (len(image_levels) - 1)
    tree = Image2DModel.parse(
        image_levels[0],
        dims=("c", "y", "x"),
        scale_factors=factors or None,
        transformations={"global": image_tf or Identity()},
    )
    if factors:  # replace the computed levels by our own encoded arrays (same shapes)
        for k, arr in enumerate(image_levels):
            node = tree[f"scale{k}"]
            da_ = node["image"]
            assert da_.shape == arr.shape, (da_.shape, arr.shape)
            tree[f"scale{k}"]["image"] = da_.copy(data=dask.array.from_array(arr, chunks=(3, 128, 128)))
    shapes = ShapesModel.parse(
        np.asarray(spots_xy, float),
        geometry=0,
        radius=np.full(len(spots_xy), radius),
        transformations={"global": shapes_tf or Identity()},
    )
    s = sd.SpatialData(images={"img": tree}, shapes={"spots": shapes})
    gd.io.set_pixel_size(s, "img", um_per_px)
    return s


def test_choose_level():
    levels = np.array([0.25, 0.5, 1.0, 2.0])
    assert choose_level(levels, 0.5) == 1
    assert choose_level(levels, 0.9) == 1  # closest not coarser
    assert choose_level(levels, 1.0) == 2
    assert choose_level(levels, 0.1) == 0  # all coarser: finest
    assert choose_level(levels, 50) == 3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tiles_come_from_the_right_place_at_every_level(level):
    size = 1024
    levels = [coordinate_image(size >> k, size >> k, step=2**k) for k in range(3)]
    spots = np.array([[301.0, 517.0], [64.0, 900.0], [700.0, 128.0]])  # level-0 px, all multiples of 4 + odd ok
    spots = np.round(spots / 4) * 4
    s = make_sdata(levels, spots, um_per_px=0.25)
    # tile resolution equal to level `level`: 0.25 * 2**level µm/px, 16 px tiles
    geo = TileGeometry(tile_um=16 * 0.25 * 2**level, tile_px=16, grid=3)
    tiler = SpotTiler(s, "img", "spots", geo)
    assert tiler.level_for(geo.um_per_px).level == level
    tiles = tiler.local_tiles([0, 1, 2])
    for t, (cx, cy) in zip(tiles, spots, strict=True):
        x, y = decode_coordinates(t)
        step = 2**level
        # output pixel j samples level pixel (c/step - 8 + j), which encodes level-0 column that * step
        expect_x = (cx / step - 8 + np.arange(16)) * step
        expect_y = (cy / step - 8 + np.arange(16)) * step
        np.testing.assert_array_equal(x, np.broadcast_to(expect_x[None, :], (16, 16)))
        np.testing.assert_array_equal(y, np.broadcast_to(expect_y[:, None], (16, 16)))


def test_non_identity_transformation_and_neighbour_grid():
    from spatialdata.transformations import Affine, Scale

    levels = [coordinate_image(512, 512), coordinate_image(256, 256, step=2)]
    # image pixels -> global: x_g = 2 x + 100, y_g = 2 y + 40 ; spots given in a 0.5x scaled frame of global
    image_tf = Affine(
        np.array([[2.0, 0, 100.0], [0, 2.0, 40.0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    shapes_tf = Scale([2.0, 2.0], axes=("x", "y"))
    pix = np.array([[200.0, 300.0], [100.0, 120.0]])  # wanted centres in level-0 px
    glob = pix * 2 + [100.0, 40.0]
    s = make_sdata(levels, glob / 2, um_per_px=1.0, image_tf=image_tf, shapes_tf=shapes_tf)
    geo = TileGeometry(tile_um=8.0, tile_px=8, grid=3)
    tiler = SpotTiler(s, "img", "spots", geo)
    np.testing.assert_allclose(tiler.centres_px(0), pix)
    local = tiler.local_tiles([0, 1])
    x, y = decode_coordinates(local[0])
    assert x[0, 0] == 196 and y[0, 0] == 296 and x[-1, -1] == 203 and y[-1, -1] == 303
    grid = tiler.neighbour_tiles([0, 1])
    assert grid.shape == (2, 9, 3, 8, 8)
    np.testing.assert_array_equal(grid[:, 4], local)  # centre tile == local tile
    # tile t = row * 3 + col: tile 5 is right of centre, tile 7 below it
    x5, y5 = decode_coordinates(grid[0, 5])
    assert x5[0, 0] == 196 + 8 and y5[0, 0] == 296
    x7, y7 = decode_coordinates(grid[0, 7])
    assert x7[0, 0] == 196 and y7[0, 0] == 296 + 8


def test_border_tiles_are_padded_white():
    levels = [coordinate_image(256, 256)]
    s = make_sdata(levels, [[2.0, 2.0]], um_per_px=1.0)
    tile = SpotTiler(s, geometry=TileGeometry(tile_um=16, tile_px=16, grid=1)).local_tiles([0])[0]
    assert (tile[:, :6, :] == 255).all() and (tile[:, :, :6] == 255).all()
    x, y = decode_coordinates(tile)
    assert x[10, 6] == 0 and y[6, 10] == 0


def test_regions_wholly_outside_the_image_are_white():
    # regression: a window left of or above the image gave a negative slice end, read from the far side
    levels = [coordinate_image(256, 256)]
    s = make_sdata(levels, [[2.0, 2.0]], um_per_px=1.0)
    reader = SpotTiler(s, geometry=TileGeometry(tile_um=16, tile_px=16, grid=1)).reader
    far = np.array([[-100.0, 50.0], [50.0, -100.0], [400.0, 50.0], [-100.0, -100.0], [50.0, 50.0]])
    tiles = reader.read_regions(far, 16, 16)
    assert (tiles[:4] == 255).all()
    x, y = decode_coordinates(tiles[4])
    assert x[0, 0] == 42 and y[0, 0] == 42  # the inside region is still read where it is


def test_resampling_scale_matches_pil_crop_on_real_section(b4, her2st_root, her2st_index):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    mpp = gd.io.get_pixel_size(b4, "B4_he")
    geo = TileGeometry(tile_um=224 * mpp, tile_px=224, grid=1)  # native resolution
    tiler = SpotTiler(b4, geometry=geo)
    i = 40
    tile = tiler.local_tiles([i])[0].astype(int)
    cx, cy = tiler.centres_px(0)[i]
    with Image.open(her2st_root / her2st_index.loc["B4", "image_path"]) as im:
        ref = im.transform(
            (224, 224), Image.Transform.AFFINE, (1, 0, cx - 112, 0, 1, cy - 112), resample=Image.Resampling.BILINEAR
        )
        crop = np.asarray(im.crop((round(cx - 112), round(cy - 112), round(cx + 112), round(cy + 112))))
    ref = np.asarray(ref).transpose(2, 0, 1)
    assert np.abs(tile - ref).max() <= 1  # same sub-pixel placement as PIL
    # and the paper's 0.5 µm/px tile covers the same 112 µm: downsampled PIL crop of the same area
    paper = SpotTiler(b4).local_tiles([i])[0].astype(float)
    half = 56 / mpp
    with Image.open(her2st_root / her2st_index.loc["B4", "image_path"]) as im:
        small = im.resize((224, 224), Image.Resampling.BILINEAR, box=(cx - half, cy - half, cx + half, cy + half))
    diff = np.abs(paper - np.asarray(small, float).transpose(2, 0, 1))
    assert diff.mean() < 3 and crop.shape == (224, 224, 3)


def test_memory_stays_flat_on_a_huge_lazy_image():
    """A 40k x 40k RGB image (4.8 GB if computed) is never computed: only the windows are read."""
    import dask.array as da
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel

    n = 40_000
    big = da.map_blocks(
        lambda block, block_info=None: np.full(block.shape, (block_info[0]["chunk-location"][1] * 7) % 255, np.uint8),
        da.empty((3, n, n), dtype=np.uint8, chunks=(3, 2048, 2048)),
        dtype=np.uint8,
    )
    img = Image2DModel.parse(big, dims=("c", "y", "x"))
    rng = np.random.default_rng(0)
    xy = rng.uniform(1000, n - 1000, (40, 2))
    s = sd.SpatialData(
        images={"big": img}, shapes={"spots": ShapesModel.parse(xy, geometry=0, radius=np.full(40, 50.0))}
    )
    gd.io.set_pixel_size(s, "big", 0.5)
    tiler = SpotTiler(s)
    tracemalloc.start()
    local = tiler.local_tiles(np.arange(40))
    grid = tiler.neighbour_tiles(np.arange(4))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert local.shape == (40, 3, 224, 224) and grid.shape == (4, 25, 3, 224, 224)
    # the value of a tile's centre pixel encodes the chunk row it comes from
    chunk_row = (xy[0, 1] // 2048).astype(int)
    assert local[0, 0, 112, 112] == (chunk_row * 7) % 255
    assert peak < 600e6, f"peak traced memory {peak / 1e6:.0f} MB"


def test_loader_with_workers_matches_direct_reads(demo):
    tiler = SpotTiler(demo[1])
    direct = tiler.local_tiles(np.arange(20))
    got = list(tile_loader(tiler, "local", batch_size=8, indices=np.arange(20), num_workers=2))
    assert [b["tiles"].shape[0] for b in got] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([b["tiles"].numpy() for b in got]), direct)
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in got]), np.arange(20))


def test_coarse_image_warns(her2st_root):
    a1 = gd.io.her2st(her2st_root, "A1")
    with pytest.warns(UserWarning, match="upsampled"):
        SpotTiler(a1)


def test_bad_input_errors_name_the_culprit(demo):
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Polygon
    from spatialdata.models import ShapesModel

    s = demo[0]
    with pytest.raises(KeyError, match="image_key='nope'"):
        SpotTiler(s, image_key="nope")
    with pytest.raises(KeyError, match="shapes_key='spots'"):
        SpotTiler(s, shapes_key="spots")
    no_size = sd.SpatialData(images={"he": s["B4_he"]}, shapes={"sp": s["B4_spots"]})
    with pytest.raises(KeyError, match="'he' has no recorded pixel size"):
        SpotTiler(no_size)
    polys = ShapesModel.parse(gpd.GeoDataFrame(geometry=[Polygon([(0, 0), (1, 0), (1, 1)])]))
    bad = sd.SpatialData(images={"he": s["B4_he"]}, shapes={"poly": polys}, attrs=dict(s.attrs))
    gd.io.set_pixel_size(bad, "he", 1.0)
    # polygons (bins, cells) are observations since 0.2: tiles centred on their centroid (other geometries:
    # tests/test_observations.py)
    assert SpotTiler(bad).n_spots == 1
    far = ShapesModel.parse(np.array([[1e7, 1e7], [10.0, 10.0]]), geometry=0, radius=np.ones(2))
    off = sd.SpatialData(images={"he": s["B4_he"]}, shapes={"sp": far})
    gd.io.set_pixel_size(off, "he", 1.0)
    with pytest.raises(ValueError, match=r"1 spots of 'sp' lie outside image 'he'.*ids \[0\]"):
        SpotTiler(off)
    with pytest.raises(ValueError, match="odd"):
        TileGeometry(grid=4)


def test_tiling_does_not_modify_sdata(demo):
    s = demo[2]
    before = (copy.deepcopy(dict(s.attrs)), s["C3_spots"].copy(), s.tables["table"].copy())
    SpotTiler(s).neighbour_tiles([0, 1])
    assert dict(s.attrs) == before[0]
    assert s["C3_spots"].equals(before[1])
    assert (s.tables["table"].X != before[2].X).nnz == 0


def test_overview_picks_the_level_that_fits_and_block_averages_otherwise():
    from genedml_sd.tiling import SlideReader

    rng = np.random.default_rng(3)
    lv0 = rng.integers(0, 256, (3, 64, 96), dtype=np.uint8)
    lv1 = rng.integers(0, 256, (3, 32, 48), dtype=np.uint8)
    s = make_sdata([lv0, lv1], [[10.0, 10.0]], um_per_px=0.5)
    reader = SlideReader.from_sdata(s, "img")
    # 48 px fits in 50: level 1 as it is, at twice the level-0 pixel size
    rgb, um = reader.overview(50)
    np.testing.assert_array_equal(rgb, np.moveaxis(lv1, 0, -1))
    assert um == (1.0, 1.0)
    # nothing fits in 20 px: level 1 averaged in 3 x 3 blocks (48 / 3 = 16 columns), rounded
    rgb, um = reader.overview(20)
    expected = lv1[:, :30, :48].reshape(3, 10, 3, 16, 3).mean(axis=(2, 4))
    np.testing.assert_array_equal(rgb, np.rint(np.moveaxis(expected, 0, -1)).astype(np.uint8))
    assert um == (3.0, 3.0)
    # the full-resolution level when it fits
    rgb, um = reader.overview(500)
    assert rgb.shape == (64, 96, 3) and um == (0.5, 0.5)
    with pytest.raises(ValueError, match="max_px"):
        reader.overview(0)
