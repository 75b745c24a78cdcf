"""Dense features: token grids of frozen encoders, mode="dense" of extract_features, encoder_calls."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genedml_sd as gd
from genedml_sd.encoders import (
    EncoderSpec,
    SpotFeatures,
    encoder_calls,
    extract_features,
    load_encoder,
    register_encoder,
)
from genedml_sd.encoders._dense import sample_grid
from genedml_sd.encoders._extract import feature_cache_key, slide_fingerprint
from genedml_sd.tiling import LatticeTiler, SpotTiler, TileGeometry, plan_lattice

from .conftest import coordinate_image
from .test_lattice import GEO, SPOTS, MeanColour, _coordinate_slide
from .test_tiling import make_sdata

GEO_V = TileGeometry(tile_um=28.0, tile_px=28, grid=3)  # 1 µm/px slide: 28 px lattice tiles, 2 µm ViT cells
HD_BINS = "HER2ST_B4_hd_square_008um"


def _tiles(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def vit():
    return load_encoder("vit-s16", pretrained=False)


@pytest.fixture(scope="module")
def tiny_vit():
    """A one-block random-init ViT-S/16 (same 14 x 14 patch grid as vit-s16, a tenth of the cost)."""
    spec = EncoderSpec(
        name="tiny-dense-vit",
        description="one-block ViT-S/16 for tests",
        timm_name="vit_small_patch16_224",
        timm_kwargs={"num_classes": 0, "depth": 1},
        embed_dim=384,
    )
    register_encoder(spec, overwrite=True)
    return load_encoder("tiny-dense-vit", pretrained=False)


@pytest.fixture(scope="module")
def stain():
    return load_encoder("stain-texture")


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    """The Visium HD layout (8 µm bins over a real HER2ST crop), restricted to the bins in [250, 700] µm squared.

    The lattice tiles of their 5 x 5 blocks then all overlap the 1,513 µm image.
    """
    outs = gd.datasets.visium_hd_layout(tmp_path_factory.mktemp("hd") / "hd")
    s = gd.io.visium_hd(outs, bin_size=8, fullres_image_file=outs.parent / "microscope.tif")
    he = "HER2ST_B4_hd_he"
    xy = SpotTiler(s, he, HD_BINS).centres_px(0) * gd.io.get_pixel_size(s, he)
    keep = np.flatnonzero(((xy > 250.0) & (xy < 700.0)).all(axis=1))
    sub = s.subset([he, HD_BINS], filter_tables=False)
    sub.shapes[HD_BINS] = s[HD_BINS].iloc[keep]
    return sub


# ------------------------------------------------------------------------------------------------ token grids
def test_vit_token_grid_is_the_patch_tokens(vit):
    x = _tiles(2)
    assert vit.has_token_grid
    with torch.inference_mode():
        pooled, grid = vit.token_grid(x)
        direct = vit(x)
        tokens = vit.backbone.forward_features(vit._normalise(x))  # (2, 1 + 196, 384) after the final norm
    assert grid.shape == (2, 384, 14, 14) and grid.dtype == torch.float32
    torch.testing.assert_close(pooled, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, tokens[:, 0], atol=1e-5, rtol=0)  # pool "token": the class token
    for v, u in [(0, 0), (3, 11), (13, 13)]:  # cell (v, u) is patch token 1 + 14 v + u
        torch.testing.assert_close(grid[:, :, v, u], tokens[:, 1 + 14 * v + u], atol=1e-6, rtol=0)


def test_resnet_token_grid_is_the_feature_map_whose_mean_is_the_feature():
    rn = load_encoder("resnet50", pretrained=False)
    x = _tiles(2, seed=1)
    with torch.inference_mode():
        pooled, grid = rn.token_grid(x)
        direct = rn(x)
    assert rn.has_token_grid and grid.shape == (2, 2048, 7, 7)
    torch.testing.assert_close(pooled, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(grid.mean((2, 3)), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("pool", "kwargs", "dim"),
    [("cls+mean", {"global_pool": "", "reg_tokens": 4}, 768), ("avg", {"global_pool": "avg"}, 384)],
)
def test_vit_token_grid_cls_mean_and_avg(pool, kwargs, dim):
    name = f"tiny-dense-{pool}"
    spec = EncoderSpec(
        name=name,
        description="one-block ViT-S/16 for tests",
        timm_name="vit_small_patch16_224",
        timm_kwargs={"num_classes": 0, "depth": 1, **kwargs},
        embed_dim=dim,
        pool=pool,
    )
    register_encoder(spec, overwrite=True)
    enc = load_encoder(name, pretrained=False)
    x = _tiles(2, seed=2)
    with torch.inference_mode():
        pooled, grid = enc.token_grid(x)
        direct = enc(x)
        tokens = enc.backbone.forward_features(enc._normalise(x))
    assert grid.shape == (2, dim, 14, 14)
    torch.testing.assert_close(pooled, direct, atol=1e-5, rtol=0)
    if pool == "cls+mean":  # cell = [class token, patch token]; 1 class + 4 register prefix tokens dropped
        assert enc.backbone.num_prefix_tokens == 5
        torch.testing.assert_close(grid[:, :384, 6, 2], tokens[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grid[:, 384:, 6, 2], tokens[:, 5 + 14 * 6 + 2], atol=1e-6, rtol=0)
        torch.testing.assert_close(grid.mean((2, 3)), direct, atol=1e-5, rtol=1e-5)
    else:  # average pool: forward_features is not normed, fc_norm is applied to every token
        norm = enc.backbone.fc_norm
        assert isinstance(norm, nn.LayerNorm)
        torch.testing.assert_close(grid[:, :, 6, 2], norm(tokens[:, 1 + 14 * 6 + 2]), atol=1e-5, rtol=0)


def test_encoders_without_token_grid_raise_type_error(stain):
    assert not stain.has_token_grid
    with pytest.raises(TypeError, match="'stain-texture'"):
        stain.token_grid(_tiles(1))

    class Flat(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    spec = EncoderSpec(name="flat-dense-test", description="", builder="custom", embed_dim=3)
    register_encoder(spec, builder=lambda spec, pretrained: Flat(), overwrite=True)
    flat = load_encoder("flat-dense-test", pretrained=False)
    assert not flat.has_token_grid
    with pytest.raises(TypeError, match="'flat-dense-test'"):
        flat.token_grid(_tiles(1))


def test_sample_grid_is_grid_sample_with_border_padding():
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(3, 5, 4, 6, generator=g)
    tile = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    frac = torch.tensor([[0.0, 0.0], [0.999, 0.5], [0.31, 0.77], [0.05, 0.99], [0.5, 0.01], [0.62, 0.4], [1.0, 1.0]])
    out = sample_grid(grid, tile, frac)
    ref = torch.stack(
        [
            F.grid_sample(
                grid[t : t + 1], (2 * f - 1).view(1, 1, 1, 2), align_corners=False, padding_mode="border"
            ).view(5)
            for t, f in zip(tile, frac, strict=True)
        ]
    )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # a cell centre ((u + 0.5) / w, (v + 0.5) / h) gives exactly that cell
    centre = sample_grid(grid, torch.tensor([1]), torch.tensor([[(4 + 0.5) / 6, (2 + 0.5) / 4]]))
    torch.testing.assert_close(centre[0], grid[1, :, 2, 4], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ dense mode
# lattice tile (3, 4) covers x 84..112, y 112..140 px; ViT cells are 2 px
DENSE_SPOTS = np.array(
    [
        [84 + 11.0, 112 + 19.0],  # centre of cell (u=5, v=9)
        [84 + 7.3, 112 + 20.6],  # between cells u 3..4 (wx 0.15) and v 9..10 (wy 0.8)
        [84 + 0.3, 112 + 0.2],  # top-left corner: clamped to cell (0, 0)
        [300.0, 200.0],  # lattice tile (10, 7)
    ]
)


def test_dense_local_features_interpolate_the_token_grid_of_the_containing_tile(tiny_vit, tmp_path):
    vit = tiny_vit
    s = make_sdata([coordinate_image(512, 512)], DENSE_SPOTS, um_per_px=1.0)
    feats = extract_features(s, vit, geometry=GEO_V, mode="dense", neighbours=False, num_workers=0, cache_dir=tmp_path)
    assert feats.mode == "dense" and feats.n_encoded_tiles == 2  # the two containing tiles, nothing per spot
    assert feats.neighbour is None and feats.tokens is None and feats.token_index is None
    tiler = SpotTiler(s, "img", "spots", GEO_V)
    tiles = LatticeTiler(tiler.reader, GEO_V, np.array([[3.5, 4.5], [10.5, 7.5]]) * 28).local_tiles([0, 1])
    with torch.inference_mode():
        pooled, grid = vit.token_grid(torch.from_numpy(tiles))
    grid = grid.numpy()
    np.testing.assert_allclose(feats.local[0], grid[0, :, 9, 5], atol=1e-5)
    by_hand = (
        grid[0, :, 9, 3] * 0.85 * 0.2
        + grid[0, :, 9, 4] * 0.15 * 0.2
        + grid[0, :, 10, 3] * 0.85 * 0.8
        + grid[0, :, 10, 4] * 0.15 * 0.8
    )
    np.testing.assert_allclose(feats.local[1], by_hand, atol=1e-5)
    np.testing.assert_allclose(feats.local[2], grid[0, :, 0, 0], atol=1e-5)
    x, y = 300.0 / 28 - 10, 200.0 / 28 - 7  # position in tile (10, 7)
    ref = F.grid_sample(
        torch.from_numpy(grid[1:2]),
        torch.tensor([[[[2 * x - 1, 2 * y - 1]]]], dtype=torch.float32),
        align_corners=False,
    )
    np.testing.assert_allclose(feats.local[3], ref.numpy().ravel(), atol=1e-5)
    meta = json.loads((tmp_path / feats.key / "meta.json").read_text())
    assert meta["mode"] == "dense" and meta["n_encoded_tiles"] == 2 and meta["lattice"]["n_tiles"] == 2
    assert meta["dense"]["token_interpolation"] is True and meta["dense"]["token_grid"] == [14, 14]

    # batching does not change anything; with neighbours the tokens are the lattice tiles' pooled features
    nb = extract_features(
        s, vit, geometry=GEO_V, mode="dense", use_cache=False, num_workers=0, batch_size=1, encode_batch_size=2
    )
    np.testing.assert_allclose(nb.local, feats.local, atol=1e-5)
    assert nb.n_encoded_tiles == 9 + 9 and nb.tokens.shape == (18, 384) and nb.token_index.shape == (4, 9)
    np.testing.assert_allclose(nb.tokens[nb.token_index[:, 4]][[0, 3]], pooled.numpy(), atol=1e-5)


def test_dense_mode_on_visium_hd_bins(hd, stain):
    n = len(hd[HD_BINS])
    calls = encoder_calls(hd, shapes_key=HD_BINS)
    feats = extract_features(hd, stain, shapes_key=HD_BINS, mode="dense", use_cache=False, num_workers=0)
    tiler = SpotTiler(hd, shapes_key=HD_BINS)
    plan = plan_lattice(tiler.centres_px(0), tiler.um_per_px0, tiler.geometry)
    assert feats.n_encoded_tiles == plan.n_tiles == calls["dense"]
    assert feats.n_encoded_tiles < n / 4, (feats.n_encoded_tiles, n)  # 81 tiles for the bins
    assert calls["spot"] == 25 * n and calls["lattice"] == plan.n_tiles + n  # no bin sits on a lattice centre
    assert feats.neighbour is None and feats.tokens.shape == (plan.n_tiles, stain.embed_dim)
    np.testing.assert_array_equal(feats.token_index, plan.token_index)
    # stain-texture has no token grid: a bin's local feature is the encoder on its containing lattice tile
    homes = np.unique(plan.home)
    tiles = LatticeTiler.from_plan(tiler, plan).local_tiles(homes)
    with torch.inference_mode():
        direct = stain(torch.from_numpy(tiles)).numpy()
    for row, k in enumerate(homes):
        inside = np.flatnonzero(plan.home == k)
        np.testing.assert_allclose(
            feats.local[inside], np.broadcast_to(direct[row], (len(inside), direct.shape[1])), atol=1e-5
        )
    np.testing.assert_allclose(feats.tokens[feats.token_index[:, 12]], feats.local, atol=1e-6)  # centre = home tile
    # the neighbour tokens gather what lattice mode gathers (off-centre tokens; its centre is the exact local tile)
    few = np.linspace(0, n - 1, 6).astype(int)
    sub = hd.subset(["HER2ST_B4_hd_he", HD_BINS], filter_tables=False)
    sub.shapes[HD_BINS] = hd[HD_BINS].iloc[few]
    lat = extract_features(sub, stain, shapes_key=HD_BINS, mode="lattice", use_cache=False, num_workers=0)
    others = [t for t in range(25) if t != 12]
    np.testing.assert_allclose(feats.neighbour_tokens(few)[:, others], lat.neighbour[:, others], atol=1e-5)
    assert lat.tokens is None and lat.token_index is None  # other modes are unchanged


def test_dense_cache_round_trip_keys_and_damage(tmp_path, caplog):
    s = _coordinate_slide(SPOTS)
    enc = MeanColour()
    kw = {"geometry": GEO, "cache_dir": tmp_path, "num_workers": 0}
    dense = extract_features(s, enc, mode="dense", **kw)
    assert enc.calls == dense.n_encoded_tiles == 18  # the 3 x 3 blocks of the lattice tiles (vs 20 in lattice mode)
    meta = json.loads((tmp_path / dense.key / "meta.json").read_text())
    assert meta["mode"] == "dense" and meta["n_tokens"] == 18 and meta["dense"]["token_interpolation"] is False
    assert set(meta["files"]) == {"local.npy", "tokens.npy", "token_index.npy"}
    assert meta["lattice"]["n_tiles"] == 18 and meta["lattice"]["max_snap_um"] > 0

    enc.calls = 0
    again = extract_features(s, enc, mode="dense", **kw)
    assert enc.calls == 0 and again.key == dense.key and again.n_encoded_tiles == 18 and again.mode == "dense"
    for name in ("local", "tokens", "token_index"):
        np.testing.assert_array_equal(getattr(again, name), getattr(dense, name))
    assert again.token_index.dtype == np.int64 and not again.tokens.flags.writeable
    local_only = extract_features(s, enc, mode="dense", neighbours=False, **kw)  # served by the dense entry
    assert enc.calls == 0 and local_only.tokens is None and local_only.mode == "dense"
    np.testing.assert_array_equal(local_only.local, dense.local)

    # never a spot-centred entry for a dense request, nor the other way round
    spot_local = extract_features(s, enc, neighbours=False, **kw)
    assert enc.calls == 3  # recomputed: the dense entry's local features are not spot-centred
    assert not np.allclose(spot_local.local[1:], dense.local[1:])  # spots 1, 2 are off their lattice tile centres
    tiler = SpotTiler(s, "img", "spots", GEO)
    keys = {(nb, m): feature_cache_key(tiler, enc, nb, m) for nb in (True, False) for m in ("spot", "lattice", "dense")}
    assert keys[True, "dense"] == dense.key and keys[False, "spot"] == spot_local.key
    assert keys[False, "lattice"] == keys[False, "spot"]
    assert (
        len({keys[True, "spot"], keys[True, "lattice"], keys[True, "dense"], keys[False, "spot"], keys[False, "dense"]})
        == 5
    )
    # the spot and lattice keys are those of earlier versions (existing caches stay valid)
    base = [slide_fingerprint(tiler), enc.fingerprint, GEO.key()]
    old = {m: hashlib.sha256("|".join(base + [m]).encode()).hexdigest()[:24] for m in ("nb", "local")}
    assert keys[True, "spot"] == old["nb"] and keys[False, "spot"] == old["local"]
    assert keys[True, "lattice"] == hashlib.sha256("|".join([*base, "nb", "lattice-v1"]).encode()).hexdigest()[:24]

    # a zeroed tokens.npy is detected and recomputed
    path = tmp_path / dense.key / "tokens.npy"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(128)
        fh.write(b"\0" * (size - 128))
    enc.calls = 0
    with caplog.at_level(logging.WARNING, logger="genedml_sd.encoders._cache"):
        fixed = extract_features(s, enc, mode="dense", **kw)
    assert any(str(path) in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records), caplog.text
    assert enc.calls == 18
    np.testing.assert_array_equal(fixed.tokens, dense.tokens)
    enc.calls = 0
    hit = extract_features(s, enc, mode="dense", **kw)
    assert enc.calls == 0
    np.testing.assert_array_equal(hit.tokens, dense.tokens)
    np.testing.assert_array_equal(hit.token_index, dense.token_index)


def test_token_index_outside_the_tokens_is_rejected(tmp_path, caplog):
    from genedml_sd.encoders import _cache

    local, tokens = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    w = _cache.EntryWriter(tmp_path, "k")
    assert w.commit(local, None, {"n_spots": 3}, tokens=tokens, token_index=np.array([[0, 5], [1, 2], [3, 3]]))
    with caplog.at_level(logging.WARNING, logger="genedml_sd.encoders._cache"):
        assert _cache.read_entry(tmp_path, "k", n_spots=3, dim=2, n_neighbours=2, dense=True) is None
    assert "outside [0, 4)" in caplog.text
    entry = _cache.read_entry(tmp_path, "k", n_spots=3, dim=2, n_neighbours=None)  # the local part is fine
    np.testing.assert_array_equal(entry.local, local)
    with pytest.raises(ValueError, match="together"):
        _cache.EntryWriter(tmp_path, "j").commit(local, None, {"n_spots": 3}, tokens=tokens)


@pytest.mark.parametrize("neighbours", [True, False])
def test_encoder_calls_match_the_extractions(neighbours):
    s = _coordinate_slide(SPOTS)
    calls = encoder_calls(s, geometry=GEO, neighbours=neighbours)
    for mode in ("spot", "lattice", "dense"):
        enc = MeanColour()
        feats = extract_features(s, enc, geometry=GEO, mode=mode, neighbours=neighbours, use_cache=False, num_workers=0)
        assert calls[mode] == feats.n_encoded_tiles == enc.calls, (mode, calls)
        assert isinstance(feats, SpotFeatures)
        if mode != "dense":
            assert feats.tokens is None and feats.token_index is None
    assert calls == ({"spot": 27, "lattice": 20, "dense": 18} if neighbours else {"spot": 3, "lattice": 3, "dense": 2})


@pytest.mark.parametrize("mode", ["lattice", "dense"])
def test_lattice_tiles_wholly_outside_the_image_are_white(mode):
    # spots 5 px from the left and the top edge: their 5 x 5 blocks reach two 16 px tiles beyond the image
    s = _coordinate_slide(np.array([[5.0, 300.0], [300.0, 5.0]]))
    geo = TileGeometry(tile_um=16.0, tile_px=16, grid=5)
    feats = extract_features(s, MeanColour(), geometry=geo, mode=mode, use_cache=False, num_workers=0)
    tokens = feats.neighbour_tokens()
    outside = [0, 1, 5, 6, 10, 11, 15, 16, 20, 21]  # columns -2, -1 of the first spot's block
    np.testing.assert_array_equal(tokens[0, outside, :3], 255.0)  # white padding: mean 255, std 0
    np.testing.assert_array_equal(tokens[0, outside, 3:], 0.0)
    np.testing.assert_array_equal(tokens[1, :10, :3], 255.0)  # rows -2, -1 of the second spot's block


def _plan_by_rows(centres, um_per_px, geometry):
    """The lattice plan computed the direct way (every spot's grid**2 cells, unique rows)."""
    pitch = geometry.tile_um / um_per_px
    base = np.floor(centres / pitch).astype(np.int64)
    r = geometry.grid // 2
    rows, cols = np.divmod(np.arange(geometry.n_neighbours), geometry.grid)
    wanted = (base[:, None, :] + np.stack([cols - r, rows - r], axis=1)[None]).reshape(-1, 2)
    uniq, inverse = np.unique(wanted[:, ::-1], axis=0, return_inverse=True)
    return uniq[:, ::-1], inverse.reshape(len(centres), -1)


def test_plan_lattice_is_fast_at_a_million_observations_and_unchanged():
    rng = np.random.default_rng(0)
    for grid, um in [(5, 0.5), (3, 1.376), (1, 0.25)]:
        geo = TileGeometry(grid=grid)
        centres = rng.uniform(-300, 6000, (500, 2))
        plan = plan_lattice(centres, um, geo)
        cells, index = _plan_by_rows(centres, um, geo)
        np.testing.assert_array_equal(plan.cells, cells)
        np.testing.assert_array_equal(plan.token_index, index)
        assert plan.token_index.dtype == np.int64 and plan.cells.dtype == np.int64
    centres = rng.uniform(0, 8000 / 0.25, (10**6, 2))  # 10^6 observations over 8 x 8 mm at 0.25 µm/px
    start = time.perf_counter()
    plan = plan_lattice(centres, 0.25, TileGeometry())
    took = time.perf_counter() - start
    assert plan.token_index.shape == (10**6, 25) and plan.n_tiles == 76 * 76
    assert took < 15.0, took  # the row-unique version took 87 s
