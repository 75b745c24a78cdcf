"""``stain-texture-nuclei``: nucleus segmentation and morphometry on drawn tiles with known nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import genedml_sd as gd
from genedml_sd.encoders._builtin import StainTexture, hed_from_rgb_matrix
from genedml_sd.encoders._morphometry import (
    EMBED_DIM,
    HIST_BINS,
    UM_PER_PX,
    StainTextureNuclei,
    feature_names,
    nucleus_statistics,
    otsu_threshold,
    split_touching,
    stain_histograms,
)

NAMES = feature_names()


def he_tile(nuclei: list[tuple[float, float, float, float]], side: int = 224) -> torch.Tensor:
    """An RGB tile (1, 3, side, side) in [0, 1]: eosin-stained tissue with ellipses of haematoxylin.

    ``nuclei`` are ``(x, y, a, b)`` centre and half-axes in px (axis-aligned ellipses).
    """
    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    h = np.full((side, side), 0.05)
    e = np.full((side, side), 0.30)
    for x0, y0, a, b in nuclei:
        inside = ((xx - x0) / a) ** 2 + ((yy - y0) / b) ** 2 <= 1
        h[inside], e[inside] = 1.0, 0.10
    rgb_from_hed = np.linalg.inv(hed_from_rgb_matrix().numpy())
    od = np.stack([h, e, np.zeros_like(h)], -1) @ rgb_from_hed  # (side, side, 3) RGB optical density
    rgb = np.clip(10.0**-od, 0, 1)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


def stats(tile: torch.Tensor) -> dict[str, float]:
    feats = StainTextureNuclei()(tile)[0].numpy()
    return {n.split("/", 1)[1]: float(v) for n, v in zip(NAMES, feats, strict=True) if n.startswith("nuclei/")}


def test_round_nuclei_on_a_lattice_are_counted_measured_and_spaced():
    r = 8  # px: 4 µm radius, 50 µm² nuclei
    centres = [(x, y) for x in range(30, 200, 40) for y in range(30, 200, 40)]  # 5 x 5, 40 px = 20 µm apart
    s = stats(he_tile([(x, y, r, r) for x, y in centres]))
    assert s["count"] == len(centres)
    assert s["area_mean"] == pytest.approx(np.pi * r**2 * UM_PER_PX**2, rel=0.25)  # smoothing widens a little
    assert s["eccentricity_mean"] < 0.3
    assert s["circularity_mean"] > 0.6
    assert s["nn_dist_median"] == pytest.approx(40 * UM_PER_PX, abs=0.5)
    assert s["nn_dist_std"] < 0.5
    assert s["large_frac"] == 1.0  # every nucleus is > 40 µm²
    assert s["major_axis_mean"] == pytest.approx(2 * r * UM_PER_PX, rel=0.3)
    # nuclei per 10^4 µm² of tissue: the whole tile is tissue (112 µm x 112 µm)
    assert s["per_1e4um2_tissue"] == pytest.approx(len(centres) / (224 * UM_PER_PX) ** 2 * 1e4, rel=0.01)


def test_shape_and_touching_nuclei():
    ellipse = stats(he_tile([(112, 112, 16, 6)]))
    assert ellipse["count"] == 1
    assert ellipse["eccentricity_mean"] == pytest.approx(np.sqrt(1 - (6 / 16) ** 2), abs=0.08)
    # two round nuclei that touch are split into two by the watershed
    pair = stats(he_tile([(100, 112, 9, 9), (117, 112, 9, 9)]))
    assert pair["count"] == 2
    assert pair["nn_dist_mean"] == pytest.approx(17 * UM_PER_PX, abs=1.0)
    mask = np.zeros((40, 40), bool)
    assert split_touching(mask) == (pytest.approx(np.zeros((40, 40))), 0)


def test_empty_white_and_black_tiles_are_finite():
    tiles = torch.cat([torch.ones(1, 3, 224, 224), torch.zeros(1, 3, 224, 224), he_tile([])])
    feats = StainTextureNuclei()(tiles)
    assert feats.shape == (3, EMBED_DIM) and torch.isfinite(feats).all()
    white = dict(zip(NAMES, feats[0].tolist(), strict=True))
    assert white["nuclei/count"] == 0 and white["nuclei/nn_dist_mean"] == pytest.approx(112.0)
    assert sum(v for n, v in white.items() if n.startswith("histogram/")) == 0  # no tissue
    assert stats(he_tile([]))["count"] == 0  # tissue without nuclei


def test_first_features_are_stain_texture_and_histograms_are_by_hand():
    rng = np.random.default_rng(0)
    tile = he_tile([(float(x), float(y), 7, 5) for x, y in rng.uniform(20, 200, (12, 2))])
    tile = (tile * torch.from_numpy(rng.uniform(0.9, 1.0, tile.shape)).float()).clamp(0, 1)
    feats = StainTextureNuclei()(tile)
    torch.testing.assert_close(feats[:, :87], StainTexture()(tile))
    od = -torch.log10(tile.clamp(min=1 / 255))
    hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb_matrix().float()).clamp(min=0)
    tissue = od.sum(1) > 0.2
    hist = stain_histograms(hed[:, 0], hed[:, 1], tissue)
    h = hed[0, 0][tissue[0]].numpy()
    expected, _ = np.histogram(np.clip(h, 0, 1.2 - 1e-9), bins=HIST_BINS, range=(0, 1.2))
    np.testing.assert_allclose(hist[0, :HIST_BINS].numpy(), expected / expected.sum(), atol=1e-6)
    np.testing.assert_allclose(hist.view(4, HIST_BINS).sum(1).numpy(), 1.0, atol=1e-6)
    assert feats[0, 87 + 20 :].tolist() == pytest.approx(hist[0].tolist(), abs=1e-6)


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.1, 0.03, 1000), rng.normal(1.0, 0.05, 300)])
    assert 0.2 < otsu_threshold(values) < 0.9
    assert otsu_threshold(np.full(5, 0.3)) == 0.3
    assert nucleus_statistics(np.zeros((8, 8)), np.zeros((8, 8), bool))[0] == 0


def test_registered_as_an_offline_encoder():
    enc = gd.encoders.load_encoder("stain-texture-nuclei")
    assert enc.embed_dim == EMBED_DIM == len(NAMES) == 139
    table = gd.encoders.list_encoders()
    row = table.loc["stain-texture-nuclei"] if "stain-texture-nuclei" in table.index else None
    assert row is not None and int(row["embed_dim"]) == 139
    assert enc.fingerprint != gd.encoders.load_encoder("stain-texture").fingerprint
    out = enc(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 139)
