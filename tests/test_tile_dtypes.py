"""Pixel types of the image: uint8, uint16 and float [0, 1] give the same tiles; out-of-range values raise."""

from __future__ import annotations

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd.encoders import extract_features, load_encoder
from genedml_sd.tiling import LatticeTiler, SpotTiler, TileGeometry, plan_lattice
from genedml_sd.tiling._reader import to_uint8

COARSE = TileGeometry(tile_um=112.0, tile_px=32, grid=3)  # 3.5 µm/px: level 1 of the demo, anti-aliased


def _retyped(sdata, convert, pixels=None):
    """The B4 demo section with every pyramid level's pixels passed (lazily) through ``convert``.

    ``pixels`` (level name -> uint8 array) replaces the lazily decoded JPEG by its pixels in memory.
    """
    import dask.array as da
    import spatialdata as sd

    tree = sdata["B4_he"].copy()
    for name in tree.children:
        level = tree[name]["image"]
        data = level.data if pixels is None else da.from_array(pixels[name], chunks=level.data.chunks)
        tree[name]["image"] = level.copy(data=convert(data))
    out = sd.SpatialData(images={"B4_he": tree}, shapes={"B4_spots": sdata["B4_spots"]})
    gd.io.set_pixel_size(out, "B4_he", gd.io.get_pixel_size(sdata, "B4_he"))
    return out


@pytest.fixture(scope="module")
def b4_types(demo):
    b4 = demo[0]
    pixels = {name: np.asarray(b4["B4_he"][name]["image"].data) for name in b4["B4_he"].children}  # decoded once
    types = {
        "uint8": lambda a: a,
        "float32": lambda a: a.astype(np.float32) / np.float32(255),
        "float64": lambda a: a.astype(np.float64) / 255.0,
        "uint16": lambda a: a.astype(np.uint16) * np.uint16(257),
        "uint16-high-byte": lambda a: a.astype(np.uint16) * np.uint16(256),  # v * 256 scales to v - v / 257
        "float-0-255": lambda a: a.astype(np.float32),  # a mistake: float, but 0..255
    }
    return {kind: _retyped(b4, convert, pixels) for kind, convert in types.items()}


def _close_tiles(a: np.ndarray, b: np.ndarray, grey_levels: int = 1) -> None:
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= grey_levels, diff.max()


@pytest.mark.parametrize("geometry", [TileGeometry(), COARSE], ids=["paper", "coarse"])
def test_same_tiles_from_uint8_float_and_uint16(b4_types, geometry):
    idx = np.arange(0, 283, 23)
    ref = SpotTiler(b4_types["uint8"], geometry=geometry)
    ref_local, ref_grid = ref.local_tiles(idx), ref.neighbour_tiles(idx[:2])
    assert ref_local.mean() > 100  # real H&E, not a black image
    plan = plan_lattice(ref.centres_px(0), ref.um_per_px0, geometry)
    cells = np.arange(0, plan.n_tiles, max(plan.n_tiles // 12, 1))
    ref_lattice = LatticeTiler.from_plan(ref, plan).local_tiles(cells)
    for kind in ("float32", "float64", "uint16", "uint16-high-byte"):
        # v * 256 scales to v - v / 257: pixels within one grey level, so tiles within two after resampling
        tol = 2 if kind == "uint16-high-byte" else 1
        tiler = SpotTiler(b4_types[kind], geometry=geometry)
        _close_tiles(tiler.local_tiles(idx), ref_local, tol)
        _close_tiles(tiler.neighbour_tiles(idx[:2]), ref_grid, tol)
        _close_tiles(LatticeTiler.from_plan(tiler, plan).local_tiles(cells), ref_lattice, tol)


def test_same_stain_texture_features_from_every_dtype(b4_types):
    stain = load_encoder("stain-texture")
    kw = {"geometry": COARSE, "use_cache": False, "num_workers": 0}
    sub = {k: s.subset(["B4_he", "B4_spots"], filter_tables=False) for k, s in b4_types.items()}
    for s in sub.values():
        s.shapes["B4_spots"] = s["B4_spots"].iloc[:8]
    ref = {m: extract_features(sub["uint8"], stain, mode=m, **kw) for m in ("spot", "lattice")}
    for kind in ("float32", "uint16"):
        for mode in ("spot", "lattice"):
            got = extract_features(sub[kind], stain, mode=mode, **kw)
            np.testing.assert_allclose(got.local, ref[mode].local, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(got.neighbour, ref[mode].neighbour, rtol=1e-3, atol=1e-3)


def test_spot_grid_tiles_of_a_float_image(b4_types):
    """An H&E-only slide (a spot grid over the whole image, no tissue mask) tiles the same from floats."""
    spots = gd.pp.spot_grid(b4_types["uint8"], "B4_he", spacing_um=400, mask=None, inplace=False)
    tiles = {}
    for kind in ("uint8", "float32"):
        s = b4_types[kind].subset(["B4_he"])
        s.shapes["grid"] = spots
        tiles[kind] = SpotTiler(s, "B4_he", "grid").local_tiles(np.arange(min(len(spots), 10)))
    _close_tiles(tiles["float32"], tiles["uint8"])


def test_float_image_holding_0_to_255_raises(b4_types):
    bad = b4_types["float-0-255"]
    tiler = SpotTiler(bad)
    with pytest.raises(
        ValueError, match=r"'B4_he' is float32 with values in \[[\d.]+, [\d.]+\] in the window read \(level 0.*\[0, 1\]"
    ):
        tiler.local_tiles([0, 1])
    with pytest.raises(ValueError, match="'B4_he' is float32"):
        LatticeTiler.from_plan(tiler, plan_lattice(tiler.centres_px(0), tiler.um_per_px0, tiler.geometry)).local_tiles(
            [0]
        )
    with pytest.raises(ValueError, match="Divide it by 255"):
        extract_features(bad, load_encoder("stain-texture"), mode="lattice", use_cache=False, num_workers=0)


def test_to_uint8_scaling_and_range_checks():
    v = np.arange(256)
    np.testing.assert_array_equal(to_uint8(v.astype(np.uint8)), v)
    np.testing.assert_array_equal(to_uint8((v * 257).astype(np.uint16)), v)
    np.testing.assert_array_equal(to_uint8((v / 255).astype(np.float32)), v)
    np.testing.assert_array_equal(to_uint8(v.astype(np.int64)), v)  # 8-bit values in a wider integer type
    # uint16 values between grey levels round to the nearest: 65535 / 255 = 257 per level
    np.testing.assert_array_equal(to_uint8(np.array([128, 129, 65535 - 129], np.uint16)), [0, 1, 254])
    # floats round to the nearest grey level; a hair outside [0, 1] is clipped
    np.testing.assert_array_equal(to_uint8(np.array([0.4 / 255, 0.6 / 255, -0.001, 1.003], np.float32)), [0, 1, 0, 255])
    with pytest.raises(ValueError, match=r"'he' is float32 with values in \[0, 1.1\] in the window read at x"):
        to_uint8(np.array([0.0, 1.1], np.float32), image_key="he", where=" at x")
    with pytest.raises(ValueError, match=r"\[-0.5, 0.5\]"):
        to_uint8(np.array([-0.5, 0.5]), image_key="he")
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([np.nan, 0.5], np.float32), image_key="he")
    with pytest.raises(ValueError, match=r"int16 with values in \[0, 300\].*uint16"):
        to_uint8(np.array([0, 300], np.int16), image_key="he")
    with pytest.raises(ValueError, match="pixel type bool"):
        to_uint8(np.array([True]), image_key="he")
