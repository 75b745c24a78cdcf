"""Construction of encoder architectures (timm, builtin, custom callables), without weights."""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from ._specs import EncoderSpec


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Run under a fixed torch seed without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of timm with ``*_layer`` values imported: ``"pkg.Cls"`` or ``{"import": "pkg.Cls", **partial_kwargs}``."""
    out = {}
    for k, v in kwargs.items():
        if k.endswith("_layer") and isinstance(v, str) and "." in v:
            v = _import(v)
        elif k.endswith("_layer") and isinstance(v, Mapping) and "import" in v:
            v = functools.partial(_import(v["import"]), **{a: b for a, b in v.items() if a != "import"})
        out[k] = v
    return out


def truncated_modules(backbone: nn.Module, after: str) -> list[str]:
    """Top-level modules of a timm CNN that come after stage ``after`` (from ``feature_info``)."""
    info = list(getattr(backbone, "feature_info", None) or [])
    names = [str(d.get("module", "")) for d in info]
    if after not in names:
        raise ValueError(f"Cannot truncate after {after!r}: the stages are {names}.")
    return [n for n in names[names.index(after) + 1 :] if n]


def _truncate(backbone: nn.Module, after: str) -> nn.Module:
    """Cut a timm CNN after a stage: later stages become identities, ``num_features`` that stage's width."""
    info = list(getattr(backbone, "feature_info", None) or [])
    for name in truncated_modules(backbone, after):
        setattr(backbone, name, nn.Identity())
    width = next(int(d["num_chs"]) for d in info if d.get("module") == after)
    setattr(backbone, "num_features", width)  # noqa: B010 - timm attributes (nn.Module types them as Tensor | Module)
    if hasattr(backbone, "head_hidden_size"):
        setattr(backbone, "head_hidden_size", width)  # noqa: B010
    return backbone


def pooled_width(backbone: nn.Module, pool: str) -> int:
    """Feature width of a timm backbone under a pooling rule.

    Parameters
    ----------
    backbone
        A timm model built with ``num_classes=0``.
    pool
        ``"token"``, ``"avg"`` or ``"cls+mean"``.

    Returns
    -------
    ``num_features`` (twice that for ``"cls+mean"``).
    """
    width = int(cast(int, backbone.num_features))  # a timm attribute (typed Tensor | Module by nn.Module)
    return 2 * width if pool == "cls+mean" else width


def build_backbone(
    spec: EncoderSpec,
    *,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
    builder: Callable[..., Any] | None = None,
) -> nn.Module:
    """Build an encoder's architecture, without weights (random init under seed 0).

    Parameters
    ----------
    spec
        The encoder spec (or use :func:`~genedml_sd.encoders.get_spec`).
    pretrained
        Only for custom builders: ask the callable for its pretrained module. timm architectures
        are always built without weights here (see :func:`~genedml_sd.encoders.load_encoder`).
    device
        Device to build on; ``"meta"`` builds shapes only (no memory, no init), e.g. to check widths.
    builder
        The callable of a ``builder="custom"`` spec (the one given to
        :func:`~genedml_sd.encoders.register_encoder`); required for such specs, ignored otherwise.

    Returns
    -------
    The backbone ``nn.Module`` (not frozen).
    """
    device = torch.device(device)
    if spec.builder == "builtin":
        from ._builtin import StainTexture
        from ._morphometry import StainTextureNuclei

        builtins: dict[str, type[torch.nn.Module]] = {
            "stain-texture": StainTexture,
            "stain-texture-nuclei": StainTextureNuclei,
        }
        if spec.name not in builtins:
            raise ValueError(f"Unknown builtin encoder {spec.name!r}; builtins: {sorted(builtins)}.")
        with device:
            return builtins[spec.name]()
    with _seeded(0), device:
        if spec.builder == "custom":
            if builder is None:
                raise ValueError(f"Encoder {spec.name!r} is built by a custom callable; pass builder=.")
            built = builder(spec, pretrained=pretrained)
            module, dim = built if isinstance(built, tuple) else (built, spec.embed_dim)
            if int(dim) != spec.embed_dim:
                raise ValueError(
                    f"Encoder {spec.name!r}: builder returned embed_dim {dim}, spec says {spec.embed_dim}."
                )
            return module
        import timm

        assert spec.timm_name is not None  # builder 'timm': EncoderSpec requires timm_name
        backbone = timm.create_model(spec.timm_name, pretrained=False, **_resolve_kwargs(spec.timm_kwargs))
        if spec.truncate_after:
            backbone = _truncate(backbone, spec.truncate_after)
    width = pooled_width(backbone, spec.pool)
    if width != spec.embed_dim:
        raise ValueError(
            f"Encoder {spec.name!r}: the architecture gives {width}-d features, the spec says {spec.embed_dim}."
        )
    return backbone


def _build_for_weights(spec: EncoderSpec, builder: Callable[..., Any] | None = None) -> nn.Module:
    """Architecture to receive a checkpoint: on ``meta`` (no wasted random init) when every tensor is in the state dict."""
    if spec.builder == "timm":
        backbone = build_backbone(spec, device="meta")
        persistent = set(backbone.state_dict())
        if all(n in persistent for n, _ in backbone.named_buffers()):
            return backbone
    return build_backbone(spec, pretrained=False, builder=builder)


# ---------------------------------------------------------------------------------------------
# builders of encoders that timm alone does not describe


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv-BN-ReLU stages and a 1x1 projection.

    Replaces the 4 x 4 patchify convolution of a Swin transformer (overall stride 4). Follows the
    description in Wang et al., Medical Image Analysis 2022 (CTransPath) and the layer layout of the
    released checkpoint (``patch_embed.proj.{0,1,3,4,6}``, ``patch_embed.norm``), read from
    github:mahmoodlab/HEST ``src/hest/bench/cpath_model_zoo/ctranspath/ctran.py``; written here
    for timm's current Swin, which gives the stem NHWC output.

    Parameters
    ----------
    img_size, patch_size, in_chans, embed_dim, norm_layer
        As timm's ``PatchEmbed`` (``patch_size`` must be 4). Other keyword arguments of timm's
        ``PatchEmbed`` are accepted and ignored.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        if p != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8.")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        c1, c2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, 1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/4, W/4, embed_dim), normalised."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath(spec: EncoderSpec, *, pretrained: bool = False) -> nn.Module:
    """CTransPath: timm's Swin-T/4 window 7 with :class:`ConvStem`, headless (768-d average pool).

    Its weights are not on a model hub: pass ``weights=`` a local ``ctranspath.pth``.
    """
    if pretrained:
        from ._weights import EncoderWeightsError

        raise EncoderWeightsError(
            f"Encoder {spec.name!r} has no weights on a model hub: download ctranspath.pth "
            "(https://github.com/Xiyue-Wang/TransPath) and pass weights='/path/to/ctranspath.pth'; "
            "or pretrained=False for a random initialisation (tests only)."
        )
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem, img_size=spec.input_px
    )


def build_conch_vision(spec: EncoderSpec, *, pretrained: bool = False) -> nn.Module:
    """CONCH v1's CoCa model whose ``forward`` is the image tower without the contrastive projection.

    ``forward(x) = encode_image(x, proj_contrast=False, normalize=False)``: the attentional-pooler
    output, 512-d. Needs the ``conch`` package (``pip install git+https://github.com/Mahmoodlab/CONCH.git``).
    Built without weights; :func:`~genedml_sd.encoders.load_encoder` loads the Hub checkpoint strictly.
    """
    try:
        from conch.open_clip_custom import CoCa
    except ImportError as err:
        raise ImportError(
            f"Encoder {spec.name!r} needs the 'conch' package: pip install git+https://github.com/Mahmoodlab/CONCH.git"
        ) from err
    import json
    from pathlib import Path

    import conch.open_clip_custom as occ

    cfg = json.loads((Path(occ.__file__).parent / "model_configs" / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)
    model = CoCa(**cfg)
    model.forward = functools.partial(model.encode_image, proj_contrast=False, normalize=False)
    return model
