"""Construction of encoder architectures (timm, builtin, custom callables), without weights."""

from __future__ import annotations

import contextlib
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


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if k.endswith("_layer") and isinstance(v, str) and "." in v:
            module, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(module), attr)
        out[k] = v
    return out


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
        if spec.name != "stain-texture":
            raise ValueError(f"Unknown builtin encoder {spec.name!r}.")
        from ._builtin import StainTexture

        with device:
            return StainTexture()
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
