"""The frozen encoder wrapper (:class:`FrozenEncoder`) and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ._specs import EncoderSpec

RANDOM_INIT = "random-init-seed0"
"""Weights identity of a randomly initialised encoder (seed 0); part of its fingerprint."""


def _fingerprint(spec: EncoderSpec, weights_id: str, extra: str = "") -> str:
    payload = json.dumps({"arch": spec.architecture(), "weights": weights_id, "extra": extra}, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


class FrozenEncoder(nn.Module):
    """A frozen tile encoder: uint8 RGB tiles in, float32 features out.

    Use :func:`~genedml_sd.encoders.load_encoder` to make one. Parameters never require gradients and the module stays
    in eval mode (``train()`` is a no-op), so it is safe inside a training loop.

    Parameters
    ----------
    backbone
        The network (timm model, builtin or custom module).
    spec
        Its spec.
    fingerprint
        Identity of the function computed (name, architecture, weights); used as cache key.

    Attributes
    ----------
    name
        Registry name.
    embed_dim
        Feature width D.
    spec
        The :class:`EncoderSpec`.
    fingerprint
        ``"<name>-<sha256 prefix>"`` of the architecture and the weights identity (the content
        sha256 of a weights file, local or from the Hub; ``"random-init-seed0"`` for random init;
        the feature-definition version for builtins).
    """

    scale: torch.Tensor  # buffers (1, 3, 1, 1), registered in __init__
    shift: torch.Tensor

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, fingerprint: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.name = spec.name
        self.embed_dim = int(spec.embed_dim)
        self.fingerprint = fingerprint
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x / 255 normalised: (x / 255 - mean) / std = x * scale - shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)
        self._channels_last = spec.builder == "timm"
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Keep eval mode whatever ``mode`` (the encoder is frozen).

        Parameters
        ----------
        mode
            Ignored.

        Returns
        -------
        self
        """
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode tiles.

        Parameters
        ----------
        x
            RGB tiles (B, 3, H, W), ``uint8`` or float in ``[0, 255]``; resized to ``input_px`` if needed.

        Returns
        -------
        Features (B, embed_dim), float32.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected tiles of shape (B, 3, H, W), got {tuple(x.shape)}.")
        x = x.to(device=self.scale.device, dtype=torch.float32)
        px = self.spec.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x = x * self.scale - self.shift
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.spec.pool == "cls+mean":
            # a timm backbone's method (nn.Module.__getattr__ is typed as returning Tensor | Module)
            forward_features = cast("Callable[[torch.Tensor], torch.Tensor]", self.backbone.forward_features)
            tokens = forward_features(x)
            n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=1)
        else:
            out = self.backbone(x)
        return out.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, fingerprint={self.fingerprint!r}"
