from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from torch import nn

from genedml_sd.encoders import (
    EncoderSpec,
    EncoderWeightsError,
    FrozenEncoder,
    _build,
    _catalogue,
    _frozen,
    get_spec,
    list_encoders,
    load_encoder,
    register_encoder,
)
from genedml_sd.encoders._builtin import EMBED_DIM, StainTexture, feature_names, rgb_to_hed

NAMES = ["uni", "uni2-h", "h-optimus-0", "virchow2", "resnet50", "vit-s16", "vit-l16", "stain-texture"]


def _tiles(n: int = 2, seed: int = 0, px: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def vit() -> FrozenEncoder:
    return load_encoder("vit-s16", pretrained=False)


@pytest.fixture(scope="module")
def stain() -> FrozenEncoder:
    return load_encoder("stain-texture")


@pytest.fixture(scope="module")
def b4_tiles(demo) -> np.ndarray:
    from genedml_sd.tiling import SpotTiler

    tiler = SpotTiler(demo[0], "B4_he", "B4_spots")
    return tiler.local_tiles(np.arange(64))


# --------------------------------------------------------------------------- registry


def test_list_encoders():
    df = list_encoders()
    assert set(NAMES) <= set(df.index)
    assert {"description", "embed_dim", "hub_id", "gated"} <= set(df.columns)
    assert df.loc["uni", "embed_dim"] == 1024 and bool(df.loc["uni", "gated"])
    assert df.loc["uni", "hub_id"] == "hf-hub:MahmoodLab/uni"
    assert not df.loc["stain-texture", "gated"] and df.loc["stain-texture", "embed_dim"] == EMBED_DIM
    names = list_encoders(names_only=True)
    assert isinstance(names, list) and set(NAMES) <= set(names)
    assert get_spec("virchow2").pool == "cls+mean"


def test_unknown_encoder_lists_names():
    with pytest.raises(KeyError, match="Unknown encoder") as info:
        load_encoder("not-an-encoder")
    assert all(n in str(info.value) for n in NAMES)
    with pytest.raises(ValueError, match="Unknown encoder"):
        get_spec("nope")


def test_register_custom_encoder():
    def build(spec, pretrained):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    spec = EncoderSpec(name="tiny-test", description="test", builder="custom", embed_dim=8, input_px=32)
    try:
        register_encoder(spec, builder=build)
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(spec, builder=build)
        enc = load_encoder("tiny-test", pretrained=False)
        out = enc(_tiles(3))  # resized 224 -> 32
        assert out.shape == (3, 8) and out.dtype == torch.float32
        assert torch.equal(out, load_encoder("tiny-test", pretrained=False)(_tiles(3)))
        assert "tiny-test" in list_encoders().index
    finally:
        _catalogue._REGISTRY.pop("tiny-test", None)


def test_spec_validation():
    with pytest.raises(ValueError, match="pool"):
        EncoderSpec(name="x", description="", timm_name="resnet50", embed_dim=2, pool="max")
    with pytest.raises(ValueError, match="hf-hub"):
        EncoderSpec(name="x", description="", timm_name="resnet50", embed_dim=2, hub_id="MahmoodLab/uni")


# --------------------------------------------------------------------------- frozen timm encoder


def test_random_init_vit_forward_and_determinism(vit):
    x = _tiles(2)
    out = vit(x)
    assert out.shape == (2, 384) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert vit.name == "vit-s16" and vit.embed_dim == 384
    assert isinstance(vit.fingerprint, str) and vit.fingerprint.startswith("vit-s16-")

    # deterministic init, and the caller's RNG is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_encoder("vit-s16", pretrained=False)
    assert torch.equal(torch.rand(3), expected)
    assert again.fingerprint == vit.fingerprint
    assert torch.equal(again(x), out)

    # float input in [0, 255] is the same as uint8
    assert torch.allclose(vit(x.float()), out, atol=1e-5)
    # other tile sizes are resized
    assert vit(_tiles(1, px=256)).shape == (1, 384)


def test_frozen_and_always_eval(vit):
    assert not any(p.requires_grad for p in vit.parameters())
    vit.train()
    assert not vit.training
    assert not any(m.training for m in vit.modules())
    x = _tiles(2, seed=1)
    assert torch.equal(vit(x), vit(x))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        vit(torch.zeros(3, 224, 224, dtype=torch.uint8))


def test_weights_file_fingerprint(vit, tmp_path):
    sd = {k: v.clone() for k, v in vit.backbone.state_dict().items()}
    a = tmp_path / "a.pt"
    torch.save(sd, a)
    perturbed = dict(sd)
    perturbed["norm.bias"] = sd["norm.bias"] + 0.5
    b = tmp_path / "b.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in perturbed.items()}, str(b))

    x = _tiles(2, seed=2)
    enc_a = load_encoder("vit-s16", weights=a)
    enc_b = load_encoder("vit-s16", weights=str(b))
    assert enc_a.fingerprint != enc_b.fingerprint
    assert enc_a.fingerprint != vit.fingerprint  # file weights vs random init
    assert torch.allclose(enc_a(x), vit(x), atol=1e-5)
    assert not torch.allclose(enc_a(x), enc_b(x), atol=1e-3)
    assert load_encoder("vit-s16", weights=a).fingerprint == enc_a.fingerprint

    # wrapped checkpoint with DDP prefixes and a classifier head is accepted
    c = tmp_path / "c.pth"
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    wrapped["module.head.weight"] = torch.zeros(1000, 384)
    wrapped["module.head.bias"] = torch.zeros(1000)
    torch.save({"state_dict": wrapped, "epoch": 3}, c)
    assert torch.allclose(load_encoder("vit-s16", weights=c)(x), enc_a(x), atol=1e-5)

    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_encoder("vit-s16", weights=missing)

    bad = tmp_path / "bad.bin"
    wrong = {k.replace("blocks.", "layers."): v for k, v in sd.items()}
    torch.save(wrong, bad)
    with pytest.raises(EncoderWeightsError, match="missing keys.*blocks.0.*unexpected keys.*layers.0") as info:
        load_encoder("vit-s16", weights=bad)
    assert "vit-s16" in str(info.value)

    shaped = tmp_path / "shape.bin"
    torch.save({**sd, "cls_token": torch.zeros(1, 1, 10)}, shaped)
    with pytest.raises(EncoderWeightsError, match="shape mismatches: cls_token"):
        load_encoder("vit-s16", weights=shaped)


def test_hub_weights_path_mocked(vit, tmp_path, monkeypatch):
    """The Hub code path with hf_hub_download mocked: the weights are loaded, fingerprint = content hash."""
    import huggingface_hub

    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.backbone.state_dict().items()}, str(path))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("token")))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    enc = load_encoder("vit-s16", hf_token="hf_dummy")
    assert calls[0] == ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "model.safetensors", "hf_dummy")
    assert enc.fingerprint == load_encoder("vit-s16", weights=path).fingerprint
    x = _tiles(2, seed=3)
    assert torch.allclose(enc(x), vit(x), atol=1e-5)


def test_gated_encoder_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder("uni")
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    for needle in (
        "'uni'",
        "MahmoodLab/uni",
        "HF_TOKEN",
        "huggingface-cli login",
        "pretrained=False",
        "weights=",
        "licence",
    ):
        assert needle in msg, needle


def test_unreachable_hub_fails_fast(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(EncoderWeightsError, match="could not be reached") as info:
        load_encoder("virchow2", hf_token="hf_dummy")
    assert time.perf_counter() - t0 < 10
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "paige-ai/Virchow2" in str(info.value)


# published parameter counts of the model cards (UNI 0.3B, UNI2-h 681M, Virchow2 632M, H-optimus-0 1.1B)
@pytest.mark.parametrize(
    ("name", "dim", "params_m"),
    [
        ("uni", 1024, 303),
        ("uni2-h", 1536, 681),
        ("h-optimus-0", 1536, 1135),
        ("virchow2", 2560, 631),
        ("resnet50", 2048, 23.5),
        ("vit-l16", 1024, 303),
    ],
)
def test_architectures_on_meta(name, dim, params_m):
    spec = get_spec(name)
    backbone = _build.build_backbone(spec, device="meta")
    assert _build.pooled_width(backbone, spec.pool) == dim == spec.embed_dim
    n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert abs(n_params - params_m) / params_m < 0.02
    enc = FrozenEncoder(backbone, spec, "test").to("meta")
    out = enc(torch.empty(2, 3, 224, 224, dtype=torch.uint8, device="meta"))
    assert tuple(out.shape) == (2, dim)


# --------------------------------------------------------------------------- stain-texture


def test_stain_texture_shape_and_finite(stain):
    names = feature_names()
    assert len(names) == len(set(names)) == EMBED_DIM == stain.embed_dim
    assert get_spec("stain-texture").version == "stain-texture-v1"
    tiles = torch.cat(
        [
            torch.full((1, 3, 224, 224), 255, dtype=torch.uint8),
            torch.zeros((1, 3, 224, 224), dtype=torch.uint8),
            _tiles(3),
        ]
    )
    out = stain(tiles)
    assert out.shape == (5, EMBED_DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert load_encoder("stain-texture").fingerprint == stain.fingerprint
    bumped = dataclasses.replace(stain.spec, version="stain-texture-v2", timm_kwargs={})
    assert _frozen._fingerprint(bumped, "x") != _frozen._fingerprint(stain.spec, "x")
    with pytest.raises(ValueError, match="no weights"):
        load_encoder("stain-texture", weights="w.bin")


def test_deconvolution_matches_skimage(b4_tiles):
    from skimage.color import rgb2hed

    tile = np.asarray(b4_tiles[5])
    ref = 6.0 * rgb2hed(tile.transpose(1, 2, 0))  # skimage's OD is ln-based, scaled by ln(1e-6)
    ours = rgb_to_hed(torch.from_numpy(tile)[None].float() / 255.0)[0].permute(1, 2, 0).numpy()
    ok = tile.min(0) > 0  # clipping of black pixels differs
    assert ok.mean() > 0.99
    np.testing.assert_allclose(ours[ok, 0], ref[ok, 0], atol=0.01)
    np.testing.assert_allclose(ours[ok], ref[ok], atol=0.02)


def _solid(rgb, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return (base + 12 * torch.randn(1, 3, 224, 224, generator=g)).clamp(0, 255).to(torch.uint8)


def test_stain_texture_separates_hematoxylin_from_eosin(stain):
    names = feature_names()
    f = stain(torch.cat([_solid((70, 50, 140)), _solid((235, 140, 195))]))  # purple vs pink
    col = {n: f[:, i] for i, n in enumerate(names)}
    assert col["colour/h_mean"][0] > 5 * col["colour/h_mean"][1]
    assert col["colour/e_mean"][1] > col["colour/e_mean"][0]
    assert col["composition/h_rich_frac"][0] > 0.9 > 0.1 > col["composition/h_rich_frac"][1]
    assert col["composition/e_rich_frac"][1] > 0.9 > 0.1 > col["composition/e_rich_frac"][0]
    assert col["colour/h_share_tissue"][0] > 0.5 > col["colour/h_share_tissue"][1]


def test_stain_texture_flip_invariant(stain, b4_tiles):
    x = torch.from_numpy(np.asarray(b4_tiles[:16]))
    a = stain(x)
    for y in (x.flip(-1), x.flip(-2), x.transpose(-1, -2)):
        b = stain(y)
        assert torch.allclose(a, b, rtol=0.05, atol=1e-4)
    # but the features are not trivially constant
    assert not torch.allclose(a[0], a[1], rtol=0.05)


def test_stain_texture_real_tiles(stain, b4_tiles):
    tiles = torch.from_numpy(np.asarray(b4_tiles))
    assert tiles.dtype == torch.uint8 and tiles.shape == (64, 3, 224, 224)
    feats = stain(tiles)
    assert torch.isfinite(feats).all()
    std = feats.std(0)
    assert (std > 1e-6).float().mean() > 0.95
    # biology sanity: haematoxylin-rich fraction correlates with the nuclear peak density
    names = feature_names()
    h_rich = feats[:, names.index("composition/h_rich_frac")]
    peaks = feats[:, names.index("nuclei/peaks7_h035_per_1e4um2")]
    assert np.corrcoef(h_rich.numpy(), peaks.numpy())[0, 1] > 0.5

    # Throughput on one thread: a lower bound that does not collapse when other processes compete
    # for the cores (torch's intra-op threads do under oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stain(tiles[:8])  # warm-up
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            stain(tiles)
        rate = reps * len(tiles) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    stain(tiles)
    rate_default = len(tiles) / (time.perf_counter() - t0)
    print(f"stain-texture: {rate:.0f} tiles/s on 1 thread, {rate_default:.0f} tiles/s on {threads} threads")
    assert rate > 50


def test_stain_texture_module_direct():
    m = StainTexture()
    x = torch.rand(2, 3, 112, 112)
    named = m.named_features(x)
    assert sum(len(n) for n, _ in named) == EMBED_DIM
    assert all(v.shape == (2, len(n)) for n, v in named)
    assert torch.equal(m(x), torch.cat([v for _, v in named], 1))
