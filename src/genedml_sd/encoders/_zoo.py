"""The default encoder zoo: every registered pathology / ImageNet encoder with its checked facts.

Each entry states the architecture, input size, normalisation, pooling and output width, the
licence, whether the Hub gates the weights and whether commercial use is allowed, with ``source``
naming where these were checked (model cards, and the reference implementations of HEST
``github:mahmoodlab/HEST src/hest/bench/cpath_model_zoo/inference_models.py``, TRIDENT
``github:mahmoodlab/TRIDENT trident/patch_encoder_models/load.py``, LazySlide's model package
``github:rendeirolab/lazyslide-models src/lazyslide_models/vision/``, kaiko's eva
``github:kaiko-ai/eva src/eva/vision/models/networks/backbones/pathology/`` and sopa
``github:gustaveroussy/sopa sopa/patches/models/``). The model cards themselves could not be
opened offline when the entries were written: facts only the cards state, and disagreements
between the references, are in ``notes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._build import build_conch_vision, build_ctranspath
from ._builtin import EMBED_DIM as STAIN_TEXTURE_DIM
from ._builtin import VERSION as STAIN_TEXTURE_VERSION
from ._morphometry import EMBED_DIM as NUCLEI_DIM
from ._morphometry import VERSION as NUCLEI_VERSION
from ._specs import (
    HIBOU_MEAN,
    HIBOU_STD,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
)

_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"

_HEST = "github:mahmoodlab/HEST src/hest/bench/cpath_model_zoo/inference_models.py"
_TRIDENT = "github:mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"
_LAZY = "github:rendeirolab/lazyslide-models src/lazyslide_models/vision/"
_EVA = "github:kaiko-ai/eva src/eva/vision/models/networks/backbones/pathology/"
_NC_ND = "CC-BY-NC-ND-4.0"
_CARD_OFFLINE = "model card not readable offline; facts from the reference implementations in source"


def _src(card: str, *refs: str) -> str:
    return "; ".join([card, *refs])


_AUGREG = "vit_%s_patch16_224.augreg_in21k_ft_in1k"


def _imagenet(name: str, description: str, weights: str, dim: int) -> EncoderSpec:
    """Timm's ImageNet encoders (comparison and speed benchmarks): ResNets average-pool, ViTs use the class token."""
    vit = weights.startswith("vit_")
    return EncoderSpec(
        name=name,
        description=description + ("; mainly for speed benchmarks" if vit else ""),
        timm_name=weights.split(".")[0],
        hub_id=f"hf-hub:timm/{weights}",
        timm_kwargs={"num_classes": 0},
        embed_dim=dim,
        pool="token" if vit else "avg",
        mean=INCEPTION_MEAN if vit else IMAGENET_MEAN,
        std=INCEPTION_STD if vit else IMAGENET_STD,
        imagenet_pretrained=True,
        source=f"https://huggingface.co/timm/{weights}",
        licence="Apache-2.0",
        commercial=None,
        notes="ImageNet weights: the commercial terms of ImageNet-trained weights are not stated.",
    )


def _builtin(name: str, description: str, dim: int, version: str, source: str, notes: str = "") -> EncoderSpec:
    """The package's own weight-free descriptors: raw [0, 1] RGB in (identity normalisation), no weights."""
    return EncoderSpec(
        name=name,
        description=description,
        builder="builtin",
        embed_dim=dim,
        pool="token",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        version=version,
        source=source,
        licence="BSD-3-Clause (this package)",
        commercial=True,
        notes=notes,
    )


_UNI2_KWARGS: dict[str, Any] = dict(  # noqa: C408
    img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
    num_classes=0, no_embed_class=True, mlp_layer=_SWIGLU, act_layer=_SILU, reg_tokens=8, dynamic_img_size=True,
)  # fmt: skip
_HOPTIMUS_KWARGS: dict[str, Any] = dict(  # noqa: C408
    img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False
)  # fmt: skip
_VIRCHOW_KWARGS: dict[str, Any] = dict(  # noqa: C408
    img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
    mlp_layer=_SWIGLU, act_layer=_SILU,
)  # fmt: skip
_H0_KWARGS: dict[str, Any] = dict(  # noqa: C408
    img_size=224, num_classes=0, mlp_ratio=2.66667 * 2, mlp_layer=_SWIGLU, act_layer=_SILU, global_pool=""
)  # fmt: skip

_SPECS: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="uni",
        description="UNI (Mahmood Lab): ViT-L/16 pathology foundation model, DINOv2 on 100k WSIs; Gene-DML's encoder",
        timm_name="vit_large_patch16_224",
        hub_id="hf-hub:MahmoodLab/uni",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        embed_dim=1024,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
        source=_src("https://huggingface.co/MahmoodLab/UNI", _HEST, _TRIDENT, _LAZY + "uni.py", _EVA + "mahmood.py"),
        licence=_NC_ND,
        commercial=False,
        notes="class token; ImageNet normalisation (TRIDENT).",
    ),
    EncoderSpec(
        name="uni2-h",
        description="UNI2-h (Mahmood Lab): ViT-H/14 with 8 register tokens and SwiGLU, 200M+ tiles",
        timm_name="vit_giant_patch14_224",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        timm_kwargs=_UNI2_KWARGS,
        embed_dim=1536,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
        source=_src("https://huggingface.co/MahmoodLab/UNI2-h", _TRIDENT, _LAZY + "uni.py", _EVA + "mahmood.py"),
        licence=_NC_ND,
        commercial=False,
        notes="class token; ImageNet normalisation (TRIDENT); 681M parameters (LazySlide).",
    ),
    EncoderSpec(
        name="h-optimus-0",
        description="H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, DINOv2 on 500k+ slides",
        timm_name="vit_giant_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        timm_kwargs=_HOPTIMUS_KWARGS,
        embed_dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        gated=True,
        source=_src(
            "https://huggingface.co/bioptimus/H-optimus-0",
            _HEST,
            _TRIDENT,
            _LAZY + "h_optimus.py",
            "github:gustaveroussy/sopa sopa/patches/models/hoptimus0.py",
        ),
        licence="Apache-2.0",
        commercial=True,
        notes="class token. Gated: TRIDENT lists it gated, LazySlide does not mark it gated (unverified offline).",
    ),
    EncoderSpec(
        name="h-optimus-1",
        description="H-optimus-1 (Bioptimus): ViT-g/14 with 4 registers, same architecture as H-optimus-0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H-optimus-1",
        timm_kwargs=_HOPTIMUS_KWARGS,
        embed_dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        gated=True,
        source=_src("https://huggingface.co/bioptimus/H-optimus-1", _TRIDENT, _LAZY + "h_optimus.py"),
        licence=_NC_ND,
        commercial=False,
        notes="class token; " + _CARD_OFFLINE,
    ),
    EncoderSpec(
        name="h0-mini",
        description="H0-mini (Bioptimus): ViT-B/14 with 4 registers, distilled from H-optimus-0; class + mean patch token",
        timm_name="vit_base_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H0-mini",
        timm_kwargs=_H0_KWARGS,
        embed_dim=1536,
        pool="cls+mean",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        gated=True,
        source=_src(
            "https://huggingface.co/bioptimus/H0-mini",
            "https://docs.bioptimus.com/sdk-reference/models/types",
            _HEST,
            _TRIDENT,
            _LAZY + "h_optimus.py",
            _EVA + "bioptimus.py",
        ),
        licence=_NC_ND,
        commercial=False,
        notes=(
            "mlp_ratio 5.33334 of the SwiGLU MLP is inferred from the published 85.7M parameters (LazySlide), "
            "the Hub config.json was not readable offline; mean/std are the H-optimus-0 constants (the Bioptimus "
            "SDK shows them rounded for H0-mini). Patch mean excludes the 4 registers."
        ),
    ),
    EncoderSpec(
        name="h0-mini-cls",
        description="H0-mini (Bioptimus), class token only",
        timm_name="vit_base_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H0-mini",
        timm_kwargs={**_H0_KWARGS, "global_pool": "token"},
        embed_dim=768,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        gated=True,
        source=_src("https://huggingface.co/bioptimus/H0-mini", _HEST, _TRIDENT),
        licence=_NC_ND,
        commercial=False,
        notes="HEST's and TRIDENT's default output (class token); see 'h0-mini' for the architecture caveat.",
    ),
    EncoderSpec(
        name="phikon",
        description="Phikon (Owkin): ViT-B/16, iBOT on 40M TCGA tiles (transformers ViTModel, run as timm)",
        timm_name="vit_base_patch16_224",
        hub_id="hf-hub:owkin/phikon",
        timm_kwargs={"num_classes": 0, "norm_layer": {"import": "torch.nn.LayerNorm", "eps": 1e-12}},
        embed_dim=768,
        key_map="hf-vit",
        source=_src("https://huggingface.co/owkin/phikon", _HEST, _TRIDENT, _LAZY + "phikon.py", _EVA + "owkin.py"),
        licence="Owkin non-commercial licence",
        commercial=False,
        notes=(
            "class token of last_hidden_state; the transformers checkpoint is mapped onto timm (key_map 'hf-vit'). "
            "LayerNorm eps 1e-12 is the transformers ViT default; Phikon's config.json was not readable offline."
        ),
    ),
    EncoderSpec(
        name="phikon-v2",
        description="Phikon-v2 (Owkin): ViT-L/16, DINOv2 on 460M public tiles (transformers Dinov2Model, run as timm)",
        timm_name="vit_large_patch16_224",
        hub_id="hf-hub:owkin/phikon-v2",
        timm_kwargs={"num_classes": 0, "init_values": 1e-5},
        embed_dim=1024,
        key_map="hf-dinov2",
        source=_src("https://huggingface.co/owkin/phikon-v2", _HEST, _TRIDENT, _LAZY + "phikon.py", _EVA + "owkin.py"),
        licence="Owkin non-commercial licence",
        commercial=False,
        notes="class token; ImageNet normalisation (TRIDENT); config.json (layer scale, grid) not readable offline.",
    ),
    EncoderSpec(
        name="virchow",
        description="Virchow (Paige): ViT-H/14 with SwiGLU, 1.5M WSIs; class + mean patch token",
        timm_name="vit_huge_patch14_224",
        hub_id="hf-hub:paige-ai/Virchow",
        timm_kwargs=_VIRCHOW_KWARGS,
        embed_dim=2560,
        pool="cls+mean",
        gated=True,
        source=_src("https://huggingface.co/paige-ai/Virchow", _HEST, _TRIDENT, _LAZY + "virchow.py"),
        licence="Apache-2.0",
        commercial=True,
        notes="no register tokens: the mean is over all 256 patch tokens; commercial terms per LazySlide (unverified).",
    ),
    EncoderSpec(
        name="virchow2",
        description="Virchow2 (Paige): ViT-H/14 with 4 registers and SwiGLU; class token + mean patch token",
        timm_name="vit_huge_patch14_224",
        hub_id="hf-hub:paige-ai/Virchow2",
        timm_kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
        embed_dim=2560,
        pool="cls+mean",
        gated=True,
        source=_src(
            "https://huggingface.co/paige-ai/Virchow2", _HEST, _TRIDENT, _LAZY + "virchow.py", _EVA + "paige.py"
        ),
        licence=_NC_ND,
        commercial=False,
        notes="the patch mean excludes the class and the 4 register tokens (tokens 5:).",
    ),
    EncoderSpec(
        name="gigapath",
        description="Prov-GigaPath tile encoder (Providence/Microsoft): ViT-g/16 (1536 wide, 40 blocks)",
        timm_name="vit_giant_patch14_dinov2",
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
        source=_src("https://huggingface.co/prov-gigapath/prov-gigapath", _HEST, _TRIDENT, _LAZY + "gigapath.py"),
        licence="Apache-2.0 with conditions (research use)",
        commercial=False,
        notes="class token; the references resize to 256 and centre-crop 224, here the tile is resized to 224.",
    ),
    EncoderSpec(
        name="conch",
        description="CONCH v1 vision tower (Mahmood Lab): ViT-B/16 at 448 px with attentional pooler, no projection",
        builder="custom",
        hub_id="hf-hub:MahmoodLab/conch",
        embed_dim=512,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        input_px=448,
        gated=True,
        hub_filenames=("pytorch_model.bin",),
        source=_src(
            "https://huggingface.co/MahmoodLab/CONCH",
            "github:mahmoodlab/CONCH conch/open_clip_custom/model_configs/conch_ViT-B-16.json",
            "github:mahmoodlab/CONCH conch/open_clip_custom/coca_model.py",
            _HEST,
            _TRIDENT,
        ),
        licence=_NC_ND,
        commercial=False,
        notes=(
            "needs the conch package; features = encode_image(proj_contrast=False, normalize=False). CONCH's own "
            "loader is non-strict; whether its checkpoint loads strictly here was not verified offline."
        ),
    ),
    EncoderSpec(
        name="hibou-b",
        description="Hibou-B (HistAI): ViT-B/14 with 4 registers, DINOv2 (transformers custom code, run as timm)",
        timm_name="vit_base_patch14_reg4_dinov2",
        hub_id="hf-hub:histai/hibou-b",
        timm_kwargs={"img_size": 224, "num_classes": 0, "global_pool": "token"},
        embed_dim=768,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        gated=True,
        key_map="hf-dinov2",
        source=_src("https://huggingface.co/histai/hibou-b", _LAZY + "hibou.py", _TRIDENT, _EVA + "histai.py"),
        licence="Apache-2.0",
        commercial=True,
        notes=(
            "pooler_output = normalised class token. The checkpoint of the Hub's custom code is assumed to follow "
            "transformers' Dinov2 names (+ embeddings.register_tokens); not verified offline (loading is strict)."
        ),
    ),
    EncoderSpec(
        name="hibou-l",
        description="Hibou-L (HistAI): ViT-L/14 with 4 registers, DINOv2 (transformers custom code, run as timm)",
        timm_name="vit_large_patch14_reg4_dinov2",
        hub_id="hf-hub:histai/hibou-L",
        timm_kwargs={"img_size": 224, "num_classes": 0, "global_pool": "token"},
        embed_dim=1024,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        gated=True,
        key_map="hf-dinov2",
        source=_src("https://huggingface.co/histai/hibou-L", _HEST, _LAZY + "hibou.py", _TRIDENT, _EVA + "histai.py"),
        licence="Apache-2.0",
        commercial=True,
        notes=(
            "as hibou-b. LazySlide states 303.7M parameters, this architecture has 303.2M: the config may differ "
            "(unverified offline); a mismatch is reported by the strict loader."
        ),
    ),
    EncoderSpec(
        name="midnight",
        description="Midnight-12k (kaiko.ai): ViT-g/14 DINOv2; class + mean patch token (transformers, run as timm)",
        timm_name="vit_giant_patch14_dinov2",
        hub_id="hf-hub:kaiko-ai/midnight",
        timm_kwargs={"img_size": 224, "num_classes": 0, "global_pool": ""},
        embed_dim=3072,
        pool="cls+mean",
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        key_map="hf-dinov2",
        source=_src("https://huggingface.co/kaiko-ai/midnight", _LAZY + "midnight.py", _TRIDENT, _EVA + "kaiko.py"),
        licence="MIT",
        commercial=True,
        notes=(
            "trained at 518 px: the checkpoint's position embeddings are resampled to the 224 px grid as "
            "transformers does. Gated: LazySlide says yes, TRIDENT lists it public (unverified offline)."
        ),
    ),
    EncoderSpec(
        name="lunit-dino-s16",
        description="Lunit DINO ViT-S/16 (Kang et al. 2023), timm port by 1aurent",
        timm_name="vit_small_patch16_224",
        hub_id="hf-hub:1aurent/vit_small_patch16_224.lunit_dino",
        timm_kwargs={"num_classes": 0},
        embed_dim=384,
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        source=_src(
            "https://huggingface.co/1aurent/vit_small_patch16_224.lunit_dino",
            "https://github.com/lunit-io/benchmark-ssl-pathology",
            _LAZY + "lunit.py",
            _EVA + "lunit.py",
        ),
        licence="Lunit non-commercial licence",
        commercial=False,
        notes="class token; normalisation constants from eva's lunit.py (Lunit's training statistics).",
    ),
    EncoderSpec(
        name="ctranspath",
        description="CTransPath: Swin-T/4 with a convolutional stem, 768-d; local weights only (weights=)",
        builder="custom",
        embed_dim=768,
        pool="avg",
        key_map="timm-swin-legacy",
        source=_src(
            "https://github.com/Xiyue-Wang/TransPath",
            "github:mahmoodlab/HEST src/hest/bench/cpath_model_zoo/ctranspath/ctran.py",
            _TRIDENT,
            _LAZY + "ctranspath.py",
        ),
        licence="GPL-3.0",
        commercial=False,
        notes="ImageNet normalisation (HEST); the released ctranspath.pth uses timm 0.5's Swin layout (converted).",
    ),
    EncoderSpec(
        name="resnet50-l3",
        description="ResNet-50 ImageNet (torchvision weights) cut after layer3 + average pool, HEST's baseline",
        timm_name="resnet50",
        hub_id="hf-hub:timm/resnet50.tv_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=1024,
        pool="avg",
        truncate_after="layer3",
        imagenet_pretrained=True,
        source=_src("https://huggingface.co/timm/resnet50.tv_in1k", _HEST, _TRIDENT),
        licence="BSD-3-Clause (torchvision weights)",
        commercial=None,
        notes="ImageNet-1k weights: the commercial terms of ImageNet-trained weights are not stated.",
    ),
    _imagenet(
        "resnet50", "ResNet-50 with timm's ImageNet weights (a1_in1k); global average pool", "resnet50.a1_in1k", 2048
    ),
    _imagenet("vit-s16", "ViT-S/16 with timm's ImageNet weights (augreg in21k->in1k)", _AUGREG % "small", 384),
    _imagenet("vit-l16", "ViT-L/16 with timm's ImageNet weights (augreg in21k->in1k)", _AUGREG % "large", 1024),
    _builtin(
        "stain-texture",
        "Offline, weight-free H&E descriptor: stain deconvolution, composition, texture, nuclei",
        STAIN_TEXTURE_DIM,
        STAIN_TEXTURE_VERSION,
        "genedml_sd.encoders._builtin",
    ),
    _builtin(
        "stain-texture-nuclei",
        "Offline, weight-free: stain-texture + segmented-nucleus morphometry + H&E histograms",
        NUCLEI_DIM,
        NUCLEI_VERSION,
        "genedml_sd.encoders._morphometry",
        notes="Nucleus segmentation runs on the CPU (scipy), tile by tile: slower than stain-texture.",
    ),
)

_BUILDERS: dict[str, Callable[..., Any]] = {"conch": build_conch_vision, "ctranspath": build_ctranspath}

ZOO: tuple[tuple[EncoderSpec, Callable[..., Any] | None], ...] = tuple((s, _BUILDERS.get(s.name)) for s in _SPECS)
"""The default registry entries, ``(spec, builder or None)``, in display order."""
