from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genedml_sd.encoders import EncoderSpec, FrozenEncoder, _catalogue, load_encoder, register_encoder
from genedml_sd.encoders._transforms import (
    D4,
    StainNormalizer,
    dihedral,
    dihedral_inverse,
    fit_stain_normalizer,
    lab_to_rgb,
    rgb_to_lab,
)


def _tiles(n: int = 2, seed: int = 0, px: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


def _by_hand(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The D4 element (k, flip) written independently: mirror columns, then k quarter turns."""
    y = torch.flip(x, dims=[-1]) if flip else x
    for _ in range(k):
        y = torch.rot90(y, 1, dims=[-2, -1])
    return y


@pytest.fixture(scope="module")
def b4_tiles(demo) -> np.ndarray:
    from genedml_sd.tiling import SpotTiler

    tiler = SpotTiler(demo[0], "B4_he", "B4_spots")
    return np.asarray(tiler.local_tiles(np.arange(24)))


@pytest.fixture()
def registered():
    """Register test encoders through the public builder mechanism; remove them afterwards."""
    names: list[str] = []

    def add(name: str, build, **kw) -> FrozenEncoder:
        spec = EncoderSpec(name=name, description="test", builder="custom", **kw)
        register_encoder(spec, builder=build, overwrite=True)
        names.append(name)
        return load_encoder(name, pretrained=False)

    yield add
    for n in names:
        _catalogue._REGISTRY.pop(n, None)


class _PatchTokens(nn.Module):
    """Tokens of 4 x 4 px patches by a pointwise map (equivariant); ``pos`` adds a position term (not equivariant)."""

    num_prefix_tokens = 1

    def __init__(self, pos: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.pos = nn.Parameter(torch.randn(1, 64, 6)) if pos else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(F.avg_pool2d(x, 4).flatten(2).transpose(1, 2))  # (B, 64, 6) for 32 px
        if self.pos is not None:
            t = t + self.pos
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)


# --------------------------------------------------------------------------- dihedral group


def test_dihedral_elements_match_numpy():
    x = torch.arange(2 * 3 * 6 * 6).reshape(2, 3, 6, 6)
    seen = set()
    for k, flip in D4:
        y = dihedral(x, k, flip)
        ref = x.numpy()[..., ::-1] if flip else x.numpy()
        np.testing.assert_array_equal(y.numpy(), np.rot90(ref, k, axes=(-2, -1)))
        assert torch.equal(dihedral_inverse(y, k, flip), x)
        seen.add(y.numpy().tobytes())
    assert len(D4) == len(seen) == 8


# --------------------------------------------------------------------------- TTA of pooled features


def test_d4_of_invariant_feature_equals_plain(registered):
    enc = registered(
        "tta-mean", lambda spec, pretrained: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), embed_dim=3
    )
    x = _tiles(4)
    tta = enc.with_transforms(tta="d4")
    plain = enc(x)
    np.testing.assert_allclose(tta(x).numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
    # and it is the per-channel mean of the normalised tile
    ref = ((x.double() / 255 - torch.tensor(enc.spec.mean).view(1, 3, 1, 1)) / torch.tensor(enc.spec.std).view(1, 3, 1, 1)).mean((2, 3))  # fmt: skip
    np.testing.assert_allclose(plain.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_d4_of_stain_texture_close_to_plain(b4_tiles):
    enc = load_encoder("stain-texture")
    x = torch.from_numpy(b4_tiles[:2])
    a, b = enc(x), enc.with_transforms(tta="d4")(x)
    assert torch.isfinite(b).all()
    assert torch.allclose(a, b, rtol=0.05, atol=1e-4)  # its features are nearly rotation invariant


def test_d4_equals_explicit_mean_over_transforms(registered):
    def build(spec, pretrained):
        return nn.Sequential(nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))

    enc = registered("tta-conv", build, embed_dim=5, input_px=32)
    x = _tiles(3)  # 224 px: resized to 32 after (TTA) or before (by hand) the transforms, which commute
    tta = enc.with_transforms(tta="d4")
    expected = torch.stack([enc(_by_hand(x, k, f)) for k, f in D4]).mean(0)
    got = tta(x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, enc(x), atol=1e-3)  # the module is not invariant: TTA changes it
    assert tta.backbone is enc.backbone and not enc.backbone.training


# --------------------------------------------------------------------------- TTA of token grids


def test_d4_grid_of_equivariant_tokens_equals_plain(registered):
    enc = registered("tta-tokens", lambda spec, pretrained: _PatchTokens(False), embed_dim=12, pool="cls+mean", input_px=32)  # fmt: skip
    x = _tiles(2, px=32)
    tta = enc.with_transforms(tta="d4")
    assert tta.has_token_grid
    pooled, grid = enc.token_grid(x)
    tpooled, tgrid = tta.token_grid(x)
    assert tgrid.shape == grid.shape == (2, 12, 8, 8)
    np.testing.assert_allclose(tgrid.numpy(), grid.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tpooled.numpy(), pooled.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tpooled.numpy(), tta(x).numpy(), rtol=1e-5, atol=1e-6)
    # without mapping each view back the cells would be scrambled
    naive = torch.stack([enc.token_grid(_by_hand(x, k, f))[1] for k, f in D4]).mean(0)
    assert not torch.allclose(naive, grid, atol=1e-3)


@pytest.mark.parametrize("which", ["custom", pytest.param("vit", marks=pytest.mark.slow)])
def test_d4_grid_equals_mean_of_mapped_back_grids(registered, which):
    if which == "custom":
        enc = registered("tta-pos", lambda spec, pretrained: _PatchTokens(True), embed_dim=12, pool="cls+mean", input_px=32)  # fmt: skip
        x = _tiles(2, px=32)
    else:
        enc = load_encoder("vit-s16", pretrained=False)
        x = _tiles(1)
    tta = enc.with_transforms(tta="d4")
    views = [enc.token_grid(_by_hand(x, k, f)) for k, f in D4]
    exp_pooled = torch.stack([p for p, _ in views]).mean(0)
    # undo the view's transform on the grid: k quarter turns back, then the mirror
    exp_grid = torch.stack(
        [
            torch.flip(torch.rot90(g, -k, dims=[-2, -1]), dims=[-1]) if f else torch.rot90(g, -k, dims=[-2, -1])
            for (k, f), (_, g) in zip(D4, views, strict=True)
        ]
    ).mean(0)
    pooled, grid = tta.token_grid(x)
    np.testing.assert_allclose(grid.numpy(), exp_grid.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), exp_pooled.numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grid, enc.token_grid(x)[1], atol=1e-3)


# --------------------------------------------------------------------------- identity / fingerprints


def test_fingerprints_name_the_transforms(b4_tiles):
    enc = load_encoder("stain-texture")
    ref = b4_tiles[3].transpose(1, 2, 0)
    mac, rei = fit_stain_normalizer(ref, "macenko"), fit_stain_normalizer(ref, "reinhard")
    other = fit_stain_normalizer(b4_tiles[7].transpose(1, 2, 0), "macenko")
    variants = {
        "none": enc.with_transforms(),
        "d4": enc.with_transforms(tta="d4"),
        "mac": enc.with_transforms(stain_norm=mac),
        "rei": enc.with_transforms(stain_norm=rei),
        "other": enc.with_transforms(stain_norm=other),
        "d4+mac": enc.with_transforms(tta="d4", stain_norm=mac),
    }
    fps = {k: v.fingerprint for k, v in variants.items()}
    assert len(set(fps.values())) == len(fps)
    assert fps["none"] == enc.fingerprint == enc.base_fingerprint  # existing caches stay valid
    assert all(v.base_fingerprint == enc.fingerprint and v.fingerprint.startswith("stain-texture-") for v in variants.values())  # fmt: skip
    # stable across two constructions (fresh encoder, fresh fit)
    again = load_encoder("stain-texture").with_transforms(tta="d4", stain_norm=fit_stain_normalizer(ref, "macenko"))
    assert again.fingerprint == fps["d4+mac"]
    assert fit_stain_normalizer(ref, "reinhard").identity == rei.identity
    assert mac.identity.startswith("macenko-v1:") and rei.identity.startswith("reinhard-v1:")
    assert variants["d4+mac"].with_transforms().fingerprint == enc.fingerprint
    assert "tta='d4'" in repr(variants["d4+mac"]) and mac.identity in repr(variants["d4+mac"])
    # the options are part of the identity, and a stored normaliser rebuilds the same one
    assert fit_stain_normalizer(ref, "macenko", alpha=2.0).identity != mac.identity
    rebuilt = StainNormalizer.from_dict(mac.to_dict())
    assert rebuilt == mac and rebuilt.identity == mac.identity
    x = torch.from_numpy(b4_tiles[:2])
    assert torch.equal(rebuilt(x), mac(x))
    with pytest.raises(ValueError, match="version"):
        StainNormalizer.from_dict({**mac.to_dict(), "version": "v0"})


def test_bad_tta_and_stain_norm_arguments():
    enc = load_encoder("stain-texture")
    for bad in ("d8", "D4", "rot90", 4):
        with pytest.raises(ValueError, match="tta must be None or one of"):
            enc.with_transforms(tta=bad)  # type: ignore[arg-type]
    assert enc.with_transforms(tta="none").fingerprint == enc.fingerprint
    with pytest.raises(TypeError, match="StainNormalizer"):
        enc.with_transforms(stain_norm="macenko")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameters"):
        StainNormalizer("reinhard", (1.0, 2.0))
    with pytest.raises(ValueError, match="method"):
        StainNormalizer("vahadane", (0.0,) * 8)


# --------------------------------------------------------------------------- stain normalisation


def test_lab_conversion_matches_skimage(b4_tiles):
    from skimage.color import lab2rgb, rgb2lab

    tile = b4_tiles[0].transpose(1, 2, 0)
    ours = rgb_to_lab(torch.from_numpy(b4_tiles[:1]).double() / 255)[0].permute(1, 2, 0).numpy()
    ref = rgb2lab(tile)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    back = lab_to_rgb(torch.from_numpy(ref).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, lab2rgb(ref), atol=1e-5)


def test_reinhard_matches_reference_lab_statistics(b4_tiles):
    from skimage.color import rgb2lab

    ref = b4_tiles[3].transpose(1, 2, 0)
    norm = fit_stain_normalizer(ref, "reinhard")
    lab_ref = rgb2lab(ref).reshape(-1, 3)
    np.testing.assert_allclose(norm.params[:3], lab_ref.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(norm.params[3:], lab_ref.std(0, ddof=1), rtol=1e-5, atol=1e-4)
    x = torch.from_numpy(b4_tiles[[0, 1, 2, 4, 6, 8]])
    out = norm(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    before = np.stack([rgb2lab(t.transpose(1, 2, 0)).reshape(-1, 3) for t in x.numpy()])
    lab = np.stack([rgb2lab(t.transpose(1, 2, 0)).reshape(-1, 3) for t in out.numpy()])
    np.testing.assert_allclose(lab.mean(1), np.broadcast_to(lab_ref.mean(0), (6, 3)), atol=0.3)
    np.testing.assert_allclose(lab.std(1), np.broadcast_to(lab_ref.std(0), (6, 3)), rtol=0.05, atol=0.1)
    assert np.abs(before.mean(1) - lab_ref.mean(0)).max() > 3  # the tiles did differ from the reference
    # the reference itself is (up to uint8 rounding) unchanged
    same = norm(torch.from_numpy(b4_tiles[3:4]))[0].numpy().astype(int)
    assert np.abs(same - b4_tiles[3]).max() <= 1


def test_macenko_reference_maps_to_itself(b4_tiles):
    tile = b4_tiles[3]
    norm = fit_stain_normalizer(tile.transpose(1, 2, 0), "macenko")
    same = norm(torch.from_numpy(tile[None]))[0].numpy().astype(float)
    err = np.abs(same - tile).mean()
    assert err < 3  # only the optical density off the two-stain plane is lost
    other = fit_stain_normalizer(b4_tiles[0].transpose(1, 2, 0), "macenko")
    moved = np.abs(other(torch.from_numpy(tile[None]))[0].numpy().astype(float) - tile).mean()
    assert moved > 3 * err


def test_macenko_transfers_reference_stains(b4_tiles):
    ref = b4_tiles[3].transpose(1, 2, 0)
    norm = fit_stain_normalizer(ref, "macenko")
    s_ref = np.array(norm.params[:6])
    out = norm(torch.from_numpy(b4_tiles[[0, 1, 4, 5]]))
    s_out = np.stack([fit_stain_normalizer(t.permute(1, 2, 0).numpy(), "macenko").params[:6] for t in out])
    s_in = np.stack([fit_stain_normalizer(t.transpose(1, 2, 0), "macenko").params[:6] for t in b4_tiles[[0, 1, 4, 5]]])
    assert np.abs(s_out[:, :3] - s_ref[:3]).max() < 0.03  # haematoxylin
    # eosin: refitting sees the faint pixels that became tissue once rescaled, so it is looser on pale tiles
    assert np.abs(s_out - s_ref).max(1).mean() < 0.05
    assert np.abs(s_out - s_ref).sum() < 0.5 * np.abs(s_in - s_ref).sum()


@pytest.mark.parametrize("gamma", [(1.6, 0.7, 1.3), (0.6, 1.5, 1.2)])
def test_macenko_undoes_a_change_of_stain_colours(b4_tiles, gamma):
    # re-stain real tiles by scaling each channel's optical density: the stains change hue and strength
    norm = fit_stain_normalizer(b4_tiles[3].transpose(1, 2, 0), "macenko")
    x = b4_tiles[[1, 3, 6]].astype(np.float64)
    od = -np.log((x + 1) / 240) * np.array(gamma).reshape(1, 3, 1, 1)
    restained = np.clip(np.round(240 * np.exp(-od) - 1), 0, 255).astype(np.uint8)
    a = norm(torch.from_numpy(b4_tiles[[1, 3, 6]])).numpy().astype(np.float64)
    b = norm(torch.from_numpy(restained)).numpy().astype(np.float64)
    change = np.abs(restained - x).mean((1, 2, 3))
    assert (change > 9).all()
    assert (np.abs(b - a).mean((1, 2, 3)) < 0.5 * change).all()  # normalised, the two stainings nearly agree


def test_macenko_recovers_synthetic_stain_vectors():
    rng = np.random.default_rng(0)
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    conc = rng.gamma(2.0, 0.4, size=(2, 96 * 96)) * (rng.random((2, 96 * 96)) < 0.7)
    conc[:, :400] = [[1.2], [0.0]]  # some pure haematoxylin and pure eosin pixels
    conc[:, 400:800] = [[0.0], [1.2]]
    od = np.stack([h, e], 1) @ conc + 0.2  # background stain offset keeps every pixel tissue
    rgb = np.clip(np.round(240 * np.exp(-od) - 1), 0, 255).astype(np.uint8).T.reshape(96, 96, 3)
    norm = fit_stain_normalizer(rgb, "macenko")
    s_h, s_e = np.array(norm.params[:3]), np.array(norm.params[3:6])
    assert abs(np.linalg.norm(s_h) - 1) < 1e-4 and abs(np.linalg.norm(s_e) - 1) < 1e-4
    # the offset shifts the OD cloud but its angular extremes stay near the pure stains
    assert s_h @ h > 0.99 and s_e @ e > 0.99


def test_background_and_degenerate_tiles_give_no_nans(registered):
    ref = fit_stain_normalizer(_tissue_like(), "macenko")
    rei = fit_stain_normalizer(_tissue_like(), "reinhard")
    white = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    glass = (torch.full((1, 3, 64, 64), 236) + torch.randint(-4, 5, (1, 3, 64, 64))).to(torch.uint8)
    speck = glass.clone()
    speck[..., :5, :5] = 90  # 25 tissue pixels: too few
    tiles = torch.cat([white, glass, speck, torch.zeros_like(white), torch.full_like(white, 128), _tiles(1, px=64)])
    for norm in (ref, rei):
        out = norm(tiles)
        assert out.dtype == torch.uint8
        assert torch.equal(out[:3], tiles[:3])  # no tissue: unchanged
        assert not torch.equal(out[5], tiles[5])  # a noisy "tissue" tile is normalised
    assert torch.equal(ref(tiles[3:5]), tiles[3:5])  # uniform tiles have no stain plane: unchanged
    enc = registered("tta-mean2", lambda spec, pretrained: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), embed_dim=3)  # fmt: skip
    for norm in (ref, rei):
        feats = enc.with_transforms(tta="d4", stain_norm=norm)(tiles)
        assert torch.isfinite(feats).all()
        np.testing.assert_allclose(feats[:3].numpy(), enc(tiles[:3]).numpy(), rtol=1e-5, atol=1e-6)


def _tissue_like(px: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    purple, pink = np.array([90, 60, 150]), np.array([230, 140, 190])
    w = rng.random((px, px, 1))
    return np.clip(w * purple + (1 - w) * pink + rng.normal(0, 6, (px, px, 3)), 0, 255).astype(np.uint8)


def test_float_input_and_autocast_give_the_same_tiles(b4_tiles):
    norm = fit_stain_normalizer(b4_tiles[3].transpose(1, 2, 0), "macenko")
    x = torch.from_numpy(b4_tiles[:3])
    out = norm(x)
    assert torch.equal(norm(x.float()), out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), out)


def test_fit_from_file_and_bad_reference_tiles(tmp_path, b4_tiles):
    from PIL import Image

    ref = b4_tiles[3].transpose(1, 2, 0)
    path = tmp_path / "ref.png"
    Image.fromarray(ref).save(path)
    assert fit_stain_normalizer(path, "reinhard").identity == fit_stain_normalizer(ref, "reinhard").identity
    with pytest.raises(ValueError, match=r"\(H, W, 3\) of dtype uint8"):
        fit_stain_normalizer(b4_tiles[3])  # channels first
    with pytest.raises(ValueError, match=r"\(H, W, 3\) of dtype uint8"):
        fit_stain_normalizer(ref.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="too small"):
        fit_stain_normalizer(ref[:8, :8])
    for method in ("macenko", "reinhard"):
        with pytest.raises(ValueError, match="% tissue"):
            fit_stain_normalizer(np.full((64, 64, 3), 245, np.uint8), method)
    with pytest.raises(ValueError, match="no two stains"):
        fit_stain_normalizer(np.full((64, 64, 3), 120, np.uint8), "macenko")
    with pytest.raises(ValueError, match="method must be one of"):
        fit_stain_normalizer(ref, "vahadane")
