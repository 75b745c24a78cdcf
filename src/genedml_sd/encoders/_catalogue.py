"""The encoder catalogue: registering, listing and loading encoders by name, and the default entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._build import _build_for_weights, build_backbone
from ._builtin import EMBED_DIM as STAIN_TEXTURE_DIM
from ._builtin import VERSION as STAIN_TEXTURE_VERSION
from ._frozen import RANDOM_INIT, FrozenEncoder, _fingerprint
from ._hub import _hub_file_sha256, download_weights
from ._specs import INCEPTION_MEAN, INCEPTION_STD, EncoderSpec, _jsonable
from ._weights import file_sha256, load_weights, read_state_dict

if TYPE_CHECKING:
    import pandas as pd


class UnknownEncoderError(KeyError, ValueError):
    """No encoder of that name is registered (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    spec: EncoderSpec
    builder: Callable[..., Any] | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(
    spec: EncoderSpec,
    *,
    builder: Callable[..., Any] | None = None,
    overwrite: bool = False,
) -> EncoderSpec:
    """Add an encoder to the registry.

    Parameters
    ----------
    spec
        The encoder's description. A timm architecture needs ``timm_name`` (and ``hub_id`` for
        pretrained weights); for a callable ``builder`` use ``builder="custom"`` in the spec (set
        automatically).
    builder
        Optional callable ``builder(spec, pretrained=bool)`` returning an ``nn.Module`` (or a
        ``(module, embed_dim)`` tuple) that maps normalised float tiles (B, 3, input_px, input_px)
        to features (B, embed_dim) (or, with ``pool="cls+mean"``, has a timm-like
        ``forward_features`` returning tokens and a ``num_prefix_tokens`` attribute). With
        ``pretrained=False`` it must not download anything; it is called under a fixed seed.
    overwrite
        Replace an existing entry of the same name.

    Returns
    -------
    The registered spec.
    """
    if builder is not None and spec.builder != "custom":
        spec = EncoderSpec(**{**asdict(spec), "builder": "custom", "timm_kwargs": dict(spec.timm_kwargs)})
    if spec.builder == "custom" and builder is None:
        raise ValueError(f"Encoder {spec.name!r}: builder='custom' needs a builder callable.")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = _Entry(spec, builder)
    return spec


def list_encoders(names_only: bool = False) -> pd.DataFrame | list[str]:
    """The registered encoders.

    Parameters
    ----------
    names_only
        Return only the names.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by name with columns ``description``, ``embed_dim``,
    ``hub_id``, ``gated``, ``builder`` and ``timm_name``; or, with ``names_only``, a list of names.
    """
    if names_only:
        return list(_REGISTRY)
    import pandas as pd

    rows = [
        {
            "name": e.spec.name,
            "description": e.spec.description,
            "embed_dim": e.spec.embed_dim,
            "hub_id": e.spec.hub_id,
            "gated": e.spec.gated,
            "builder": e.spec.builder,
            "timm_name": e.spec.timm_name,
        }
        for e in _REGISTRY.values()
    ]
    return pd.DataFrame(rows).set_index("name")


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder.

    Parameters
    ----------
    name
        Registry name.

    Returns
    -------
    The :class:`EncoderSpec`.

    Raises
    ------
    UnknownEncoderError
        (a ``KeyError`` and ``ValueError``) if no such encoder is registered.
    """
    return _entry(name).spec


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownEncoderError(
            f"Unknown encoder {name!r}. Available encoders: {', '.join(_REGISTRY)} "
            "(see genedml_sd.encoders.list_encoders(); add your own with register_encoder())."
        ) from None


def load_encoder(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | PathLike | None = None,
    hf_token: str | None = None,
    device: str | torch.device = "cpu",
) -> FrozenEncoder:
    """Load a frozen encoder by name.

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`), e.g. ``"uni"`` (the paper's), ``"stain-texture"``
        (offline, no weights).
    pretrained
        Load the pretrained weights (from the Hugging Face Hub, or timm's ImageNet weights). Never
        falls back silently: if the weights cannot be had, :class:`EncoderWeightsError` is raised.
        ``False`` gives a deterministic random initialisation (seed 0, caller's RNG untouched) and
        never touches the network: for tests and benchmarks only.
    weights
        Local weights file (``.bin``, ``.pth``, ``.pt``, ``.safetensors``) to load instead of the
        Hub's; takes precedence over ``pretrained``. Loaded strictly.
    hf_token
        Hugging Face token for gated models (default: ``HF_TOKEN`` or the stored login).
    device
        Device to put the encoder on.

    Returns
    -------
    The :class:`FrozenEncoder` (eval mode, no gradients).

    Raises
    ------
    UnknownEncoderError
        Unknown ``name`` (a ``KeyError`` and ``ValueError``; the message lists the encoders).
    FileNotFoundError
        ``weights`` does not exist.
    EncoderWeightsError
        Pretrained weights cannot be downloaded, or the weights do not fit the architecture.
    """
    entry = _entry(name)
    spec = entry.spec
    extra = ""
    if spec.builder == "custom":
        extra = _jsonable(entry.builder)
    if spec.builder == "builtin":
        if weights is not None:
            raise ValueError(f"Encoder {name!r} has no weights; do not pass weights=.")
        backbone = build_backbone(spec)
        weights_id = spec.version or name
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Encoder weights file not found: {str(path)!r}.")
        state_dict = read_state_dict(path)
        backbone = load_weights(_build_for_weights(spec, entry.builder), state_dict, name=name, source=repr(str(path)))
        weights_id = "sha256:" + file_sha256(path)
    elif not pretrained:
        backbone = build_backbone(spec, pretrained=False, builder=entry.builder)
        weights_id = RANDOM_INIT
        if spec.builder == "timm":
            import timm

            weights_id += f":timm-{timm.__version__}"
    elif spec.builder == "custom":
        backbone = build_backbone(spec, pretrained=True, builder=entry.builder)
        weights_id = "custom-pretrained"
    else:
        path = download_weights(spec, hf_token=hf_token)
        backbone = load_weights(
            _build_for_weights(spec, entry.builder),
            read_state_dict(path),
            name=name,
            source=f"{spec.hub_id} ({path.name})",
        )
        weights_id = "sha256:" + _hub_file_sha256(path)
    encoder = FrozenEncoder(backbone, spec, _fingerprint(spec, weights_id, extra))
    return encoder.to(device)


# ---------------------------------------------------------------------------------------------
# default registry

_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"

_DEFAULTS = (
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
    ),
    EncoderSpec(
        name="uni2-h",
        description="UNI2-h (Mahmood Lab): ViT-H/14 with 8 register tokens and SwiGLU, 200M+ tiles",
        timm_name="vit_giant_patch14_224",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
    ),
    EncoderSpec(
        name="h-optimus-0",
        description="H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, DINOv2 on 500k+ slides",
        timm_name="vit_giant_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "global_pool": "token",
            "dynamic_img_size": False,
        },
        embed_dim=1536,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        gated=True,
    ),
    EncoderSpec(
        name="virchow2",
        description="Virchow2 (Paige): ViT-H/14 with 4 registers and SwiGLU; class token + mean patch token",
        timm_name="vit_huge_patch14_224",
        hub_id="hf-hub:paige-ai/Virchow2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
        },
        embed_dim=2560,
        pool="cls+mean",
        gated=True,
    ),
    EncoderSpec(
        name="resnet50",
        description="ResNet-50 with timm's ImageNet weights (a1_in1k); global average pool",
        timm_name="resnet50",
        hub_id="hf-hub:timm/resnet50.a1_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=2048,
        pool="avg",
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="vit-s16",
        description="ViT-S/16 with timm's ImageNet weights (augreg in21k->in1k); mainly for speed benchmarks",
        timm_name="vit_small_patch16_224",
        hub_id="hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=384,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="vit-l16",
        description="ViT-L/16 with timm's ImageNet weights (augreg in21k->in1k); mainly for speed benchmarks",
        timm_name="vit_large_patch16_224",
        hub_id="hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=1024,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="stain-texture",
        description="Offline, weight-free H&E descriptor: stain deconvolution, composition, texture, nuclei",
        builder="builtin",
        embed_dim=STAIN_TEXTURE_DIM,
        pool="token",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        version=STAIN_TEXTURE_VERSION,
    ),
)

for _spec in _DEFAULTS:
    register_encoder(_spec)
del _spec
