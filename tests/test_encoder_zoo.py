"""The encoder zoo: registry facts, architectures (meta device), checkpoint mappings, timm names, wrapped modules."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genedml_sd.encoders import (
    EncoderSpec,
    EncoderWeightsError,
    FrozenEncoder,
    UnknownEncoderError,
    _build,
    _catalogue,
    _weights,
    get_spec,
    list_encoders,
    load_encoder,
    register_encoder,
)
from genedml_sd.encoders._catalogue import wrap_encoder

IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# name: (D, input px, pool, (mean, std), gated, commercial) as verified against the model cards /
# reference implementations cited in each entry's `source`
FACTS = {
    "uni": (1024, 224, "token", IMNET, True, False),
    "uni2-h": (1536, 224, "token", IMNET, True, False),
    "h-optimus-0": (1536, 224, "token", HOPT, True, True),
    "h-optimus-1": (1536, 224, "token", HOPT, True, False),
    "h0-mini": (1536, 224, "cls+mean", HOPT, True, False),
    "h0-mini-cls": (768, 224, "token", HOPT, True, False),
    "phikon": (768, 224, "token", IMNET, False, False),
    "phikon-v2": (1024, 224, "token", IMNET, False, False),
    "virchow": (2560, 224, "cls+mean", IMNET, True, True),
    "virchow2": (2560, 224, "cls+mean", IMNET, True, False),
    "gigapath": (1536, 224, "token", IMNET, True, False),
    "conch": (512, 448, "token", CLIP, True, False),
    "hibou-b": (768, 224, "token", HIBOU, True, True),
    "hibou-l": (1024, 224, "token", HIBOU, True, True),
    "midnight": (3072, 224, "cls+mean", HALF, False, True),
    "lunit-dino-s16": (384, 224, "token", LUNIT, False, False),
    "ctranspath": (768, 224, "avg", IMNET, False, False),
    "resnet50-l3": (1024, 224, "avg", IMNET, False, None),
    "resnet50": (2048, 224, "avg", IMNET, False, None),
}
# published parameter counts (M): model cards / LazySlide's registry; None where not published
PARAMS = {
    "h-optimus-1": 1135,
    "h0-mini": 85.7,
    "phikon": 85.8,
    "phikon-v2": 303.4,
    "virchow": 631.2,
    "gigapath": 1134,
    "hibou-b": 85.7,
    "midnight": 1135,
    "lunit-dino-s16": 21.7,
}
# timm meta-device widths: (number of prefix tokens: class + registers)
PREFIX = {"virchow": 1, "virchow2": 5, "h0-mini": 5, "midnight": 1, "hibou-b": 5, "uni2-h": 9}


def _tiles(n: int = 2, seed: int = 0, px: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


def _normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


# --------------------------------------------------------------------------- registry facts


@pytest.mark.parametrize("name", sorted(FACTS))
def test_zoo_facts(name):
    dim, px, pool, (mean, std), gated, commercial = FACTS[name]
    spec = get_spec(name)
    assert (spec.embed_dim, spec.input_px, spec.pool, spec.gated, spec.commercial) == (dim, px, pool, gated, commercial)
    np.testing.assert_allclose(spec.mean, mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(spec.std, std, rtol=0, atol=1e-9)
    assert spec.source and spec.licence
    row = list_encoders().loc[name]
    assert (row["input_px"], row["pool"], row["commercial"]) == (px, pool, commercial)
    assert tuple(row["mean"]) == tuple(spec.mean) and row["source"] == spec.source


def test_list_encoders_columns_and_every_entry_cited():
    from genedml_sd.encoders._zoo import ZOO

    df = list_encoders()
    assert {"input_px", "pool", "mean", "std", "licence", "gated", "commercial", "source"} <= set(df.columns)
    df = df.loc[[spec.name for spec, _ in ZOO]]  # the defaults (other tests register encoders of their own)
    assert set(FACTS) <= set(df.index)
    assert all(isinstance(s, str) and len(s) > 10 for s in df["source"])
    assert all(isinstance(s, str) and s for s in df["licence"])
    assert set(df["commercial"].map(repr)) <= {"True", "False", "None"}


def test_docs_table_matches_registry():
    path = Path(__file__).resolve().parents[1] / "scripts" / "encoder_table.py"
    spec = importlib.util.spec_from_file_location("encoder_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.render()
    assert mod.current(mod.DOC.read_text()) == table, "docs/encoders.md is stale: run scripts/encoder_table.py"
    for name in FACTS:
        assert f"| `{name}` | {FACTS[name][0]} | {FACTS[name][1]} |" in table


def test_fingerprints_of_earlier_entries_unchanged():
    # values of the registry before the zoo (metadata fields and later fields at their defaults are
    # not part of the architecture), so existing feature caches stay valid
    expected = {
        "uni": "uni-8e2f6488bebb8d7b25fa",
        "uni2-h": "uni2-h-c0bea72105b3f463a4dc",
        "h-optimus-0": "h-optimus-0-0b0d9148b620608711d3",
        "virchow2": "virchow2-3cd8db27eff9389f8e49",
        "resnet50": "resnet50-ce0e6f7a6e011f2c9812",
        "vit-s16": "vit-s16-14522230ea50b51bf22a",
    }
    from genedml_sd.encoders._frozen import _fingerprint

    assert {n: _fingerprint(get_spec(n), "x") for n in expected} == expected


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", sorted(n for n in FACTS if get_spec(n).builder == "timm"))
def test_timm_architectures_on_meta(name):
    spec = get_spec(name)
    backbone = _build.build_backbone(spec, device="meta")
    assert _build.pooled_width(backbone, spec.pool) == spec.embed_dim
    if name in PREFIX:
        assert backbone.num_prefix_tokens == PREFIX[name]
    if name in PARAMS:
        n = sum(p.numel() for p in backbone.parameters()) / 1e6
        assert abs(n - PARAMS[name]) / PARAMS[name] < 0.005, n
    enc = FrozenEncoder(backbone, spec, "test").to("meta")
    out = enc(torch.empty(2, 3, 256, 256, dtype=torch.uint8, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)


def test_resnet50_l3_is_resnet50_up_to_layer3_and_loads_full_checkpoints(tmp_path):
    import timm

    enc = load_encoder("resnet50-l3", pretrained=False)
    with _build._seeded(0):
        full = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    x = _tiles(2)
    h = _normalised(x, *IMNET)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(h))))
        ref = full.layer3(full.layer2(full.layer1(h))).mean((2, 3))
        out = enc(x)
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert enc.has_token_grid and enc.token_grid(x[:1])[1].shape == (1, 1024, 14, 14)
    # a complete ResNet-50 checkpoint (layer4 and the fc head included) loads strictly
    sd = {k: v + 0.01 * (i % 3) for i, (k, v) in enumerate(full.state_dict().items())}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(sd, tmp_path / "r50.pth")
    loaded = load_encoder("resnet50-l3", weights=tmp_path / "r50.pth")
    assert loaded.fingerprint != enc.fingerprint
    full.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(_normalised(x, *IMNET)))))
        ref = full.layer3(full.layer2(full.layer1(h))).mean((2, 3))
        torch.testing.assert_close(loaded(x), ref, atol=1e-4, rtol=1e-4)


def test_ctranspath_random_and_legacy_checkpoint(tmp_path):
    enc = load_encoder("ctranspath", pretrained=False)
    assert sum(p.numel() for p in enc.backbone.parameters()) / 1e6 == pytest.approx(27.5, abs=0.05)
    x = _tiles(2, seed=1)
    out = enc(x)
    assert out.shape == (2, 768) and torch.isfinite(out).all()
    # the released checkpoint's layout (timm 0.5: downsample at the end of a stage, mask buffers,
    # wrapped in {"model": ...}) is converted onto timm's current Swin
    legacy = {}
    for k, v in enc.backbone.state_dict().items():
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        legacy[".".join(parts)] = v.clone()
    legacy["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    legacy["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    torch.save({"model": legacy}, tmp_path / "ctranspath.pth")
    again = load_encoder("ctranspath", weights=tmp_path / "ctranspath.pth")
    torch.testing.assert_close(again(x), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(EncoderWeightsError, match="weights="):
        load_encoder("ctranspath")


def test_conch_needs_its_package():
    if importlib.util.find_spec("conch") is not None:
        pytest.skip("conch is installed")
    with pytest.raises(ImportError, match="Mahmoodlab/CONCH"):
        load_encoder("conch", pretrained=False)


# --------------------------------------------------------------------------- transformers checkpoints


def _hf_vit_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict written in transformers' ViTModel layout (Hub checkpoint names)."""
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"]}
    out["vit.embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
    out["vit.embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
    out["vit.layernorm.weight"], out["vit.layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}
    names |= {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(n):
        for kind in ("weight", "bias"):
            for ours, theirs in names.items():
                out[f"vit.encoder.layer.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, 0)
            for part, t in zip(("query", "key", "value"), (q, k, v), strict=True):
                out[f"vit.encoder.layer.{i}.attention.attention.{part}.{kind}"] = t
    out["vit.pooler.dense.weight"] = torch.zeros(1)
    return out


def test_hf_vit_checkpoint_into_timm_without_transformers(tmp_path):
    spec = EncoderSpec(
        name="hf-vit-test",
        description="test",
        timm_name="vit_tiny_patch16_224",
        timm_kwargs={"num_classes": 0, "img_size": 64, "norm_layer": {"import": "torch.nn.LayerNorm", "eps": 1e-12}},
        embed_dim=192,
        input_px=64,
        key_map="hf-vit",
    )
    try:
        register_encoder(spec)
        ref = load_encoder("hf-vit-test", pretrained=False)
        assert ref.backbone.norm.eps == 1e-12
        sd = {k: v + 0.01 for k, v in ref.backbone.state_dict().items()}
        torch.save(_hf_vit_layout(sd), tmp_path / "pytorch_model.bin")
        enc = load_encoder("hf-vit-test", weights=tmp_path / "pytorch_model.bin")
        ref.backbone.load_state_dict(sd)
        x = _tiles(2, px=64)
        torch.testing.assert_close(enc(x), ref(x), atol=1e-5, rtol=1e-5)
    finally:
        _catalogue._REGISTRY.pop("hf-vit-test", None)


def test_transformers_models_equal_their_timm_equivalents():
    transformers = pytest.importorskip("transformers")
    import timm
    from timm.layers import SwiGLUPacked

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 16}
    tiny = functools.partial(
        timm.create_model, pretrained=False, num_classes=0, img_size=64, embed_dim=64, depth=2, num_heads=4
    )
    cases = [  # (transformers model, timm model, key_map): stored grids of 96 px are resampled to 64 px
        (
            transformers.ViTModel(transformers.ViTConfig(**small, intermediate_size=256, image_size=64), False),
            tiny("vit_tiny_patch16_224", norm_layer=functools.partial(nn.LayerNorm, eps=1e-12)),
            "hf-vit",
        ),
        (
            transformers.Dinov2Model(transformers.Dinov2Config(**small, image_size=96, layerscale_value=0.5)),
            tiny("vit_tiny_patch16_224", init_values=1e-5),
            "hf-dinov2",
        ),
        (
            transformers.Dinov2Model(transformers.Dinov2Config(**small, image_size=64, use_swiglu_ffn=True)),
            tiny("vit_tiny_patch16_224", init_values=1e-5, mlp_ratio=5.5, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
            "hf-dinov2",
        ),
    ]
    if hasattr(transformers, "Dinov2WithRegistersModel"):
        cfg = transformers.Dinov2WithRegistersConfig(**small, image_size=96, num_register_tokens=4)
        cases.append(
            (
                transformers.Dinov2WithRegistersModel(cfg),
                tiny("vit_base_patch14_reg4_dinov2", patch_size=16),
                "hf-dinov2",
            )
        )
    for hf, tm, key_map in cases:
        hf.eval(), tm.eval()
        sd = _weights.convert_state_dict(hf.state_dict(), key_map, tm)
        _weights.load_weights(tm, sd, name=key_map, source="transformers")
        with torch.no_grad():
            torch.testing.assert_close(
                tm.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-4
            )


# --------------------------------------------------------------------------- timm: / hf-hub: names


def test_timm_prefixed_name():
    import timm

    enc = load_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    assert (enc.embed_dim, enc.spec.input_px, enc.spec.pool) == (192, 224, "token")
    assert (
        enc.spec.mean == (0.5, 0.5, 0.5) and enc.spec.hub_id == "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    )
    with _build._seeded(0):
        ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    x = _tiles(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(_normalised(x, *HALF)), atol=1e-4, rtol=1e-4)
    assert get_spec("timm:vit_tiny_patch16_224").embed_dim == 192
    assert "timm:vit_tiny_patch16_224" not in list_encoders(names_only=True)
    cnn = load_encoder("timm:resnet18", pretrained=False)
    assert (cnn.embed_dim, cnn.spec.pool, cnn.spec.mean) == (512, "avg", IMNET[0]) and cnn.has_token_grid
    kw = load_encoder("timm:vit_tiny_patch16_224", pretrained=False, timm_kwargs={"global_pool": "avg"})
    assert kw.spec.pool == "avg" and kw.fingerprint != enc.fingerprint


def test_timm_prefixed_pretrained_goes_through_the_hub_loader(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    ref = load_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() + 0.5 for k, v in ref.backbone.state_dict().items()}, str(path))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    enc = load_encoder("timm:vit_tiny_patch16_224")
    assert calls[0] == ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    assert enc.fingerprint == load_encoder("timm:vit_tiny_patch16_224", weights=path).fingerprint != ref.fingerprint


def test_unknown_prefixed_names_fail_clearly(monkeypatch):
    with pytest.raises(UnknownEncoderError, match="timm has no model named 'not_a_model'"):
        load_encoder("timm:not_a_model", pretrained=False)
    with pytest.raises(KeyError):
        get_spec("timm:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsError, match="config.json of 'hf-hub:nobody/no-such-repo'"):
        load_encoder("hf-hub:nobody/no-such-repo", pretrained=False)
    with pytest.raises(ValueError, match="timm_kwargs"):
        load_encoder("uni", pretrained=False, timm_kwargs={"img_size": 448})


# --------------------------------------------------------------------------- wrapped modules


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=4)
        self.register_buffer("offset", torch.arange(6.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) + self.offset


def test_wrap_encoder_module():
    torch.manual_seed(0)
    net = _Tiny()
    mean, std = (0.6, 0.5, 0.7), (0.2, 0.25, 0.15)
    try:
        enc = wrap_encoder(net, name="tiny-wrap", mean=mean, std=std, input_px=32)
        assert enc.embed_dim == 6 and not any(p.requires_grad for p in net.parameters())
        x = _tiles(3, seed=5, px=32)
        with torch.no_grad():
            torch.testing.assert_close(enc(x), net(_normalised(x, mean, std)), atol=1e-5, rtol=1e-5)
        assert enc(_tiles(1, px=64)).shape == (1, 6)  # resized to 32 px
        assert "tiny-wrap" in list_encoders().index and get_spec("tiny-wrap").input_px == 32
        fp = enc.fingerprint
        assert load_encoder("tiny-wrap").fingerprint == fp
        assert wrap_encoder(net, name="tiny-wrap", mean=mean, std=std, input_px=32).fingerprint == fp
        with torch.no_grad():
            net.conv.weight[0, 0, 0, 0] += 1.0
        changed = wrap_encoder(net, name="tiny-wrap", mean=mean, std=std, input_px=32)
        assert changed.fingerprint != fp  # other weights, other cache key
        other_norm = wrap_encoder(net, name="tiny-wrap", mean=mean, std=(0.3, 0.3, 0.3), input_px=32)
        assert other_norm.fingerprint != changed.fingerprint
        with pytest.raises(ValueError, match="own weights"):
            load_encoder("tiny-wrap", weights="w.bin")
    finally:
        _catalogue._REGISTRY.pop("tiny-wrap", None)


def test_wrap_encoder_callable_and_guards():
    torch.manual_seed(1)
    net = _Tiny()
    try:
        enc = wrap_encoder(net.forward, name="tiny-fn", mean=(0.5,) * 3, std=(0.5,) * 3, input_px=32, embed_dim=6)
        assert enc.embed_dim == 6
        x = _tiles(2, px=32)
        with torch.no_grad():
            torch.testing.assert_close(enc(x), net(_normalised(x, *HALF)), atol=1e-5, rtol=1e-5)
        # the bound method's module is hashed
        assert _weights.module_sha256(enc.backbone) != _weights.module_sha256(_Tiny())
        fn = wrap_encoder(lambda t: t.mean((2, 3)), name="tiny-fn", mean=(0.5,) * 3, std=(0.5,) * 3)
        assert fn.embed_dim == 3
    finally:
        _catalogue._REGISTRY.pop("tiny-fn", None)
    with pytest.raises(ValueError, match="already registered|default encoder"):
        wrap_encoder(net, name="uni", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="timm:"):
        register_encoder(EncoderSpec(name="timm:x", description="", timm_name="resnet18", embed_dim=512))
    with pytest.raises(TypeError):
        wrap_encoder(3, name="x", mean=(0.5,) * 3, std=(0.5,) * 3)
