"""The frozen encoder wrapper (:class:`FrozenEncoder`) and its fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._specs import EncoderSpec
from ._transforms import D4, StainNormalizer, check_tta, dihedral, dihedral_inverse

RANDOM_INIT = "random-init-seed0"
"""Weights identity of a randomly initialised encoder (seed 0); part of its fingerprint."""


def _fingerprint(spec: EncoderSpec, weights_id: str, extra: str = "") -> str:
    payload = json.dumps({"arch": spec.architecture(), "weights": weights_id, "extra": extra}, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def _transformed_fingerprint(base: str, name: str, tta: str | None, stain_norm: StainNormalizer | None) -> str:
    """``base`` itself without transforms (existing caches stay valid), else a new ``"<name>-<sha256 prefix>"``."""
    if tta is None and stain_norm is None:
        return base
    stain = None if stain_norm is None else stain_norm.identity
    payload = json.dumps({"base": base, "tta": tta, "stain_norm": stain}, sort_keys=True)
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


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
        Identity of the backbone's function (name, architecture, weights).
    tta
        Test-time augmentation: ``None`` or ``"d4"`` (features averaged over the 8 rotations and
        mirror images of each tile, see :meth:`with_transforms`).
    stain_norm
        Stain normalisation applied to the uint8 tiles first (:func:`~genedml_sd.encoders.fit_stain_normalizer`), or ``None``.

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
        the feature-definition version for builtins), and of the tile transforms if any (then it
        differs from ``base_fingerprint``); the feature cache key.
    base_fingerprint
        The fingerprint without the tile transforms.
    tta, stain_norm
        The tile transforms.
    """

    scale: torch.Tensor  # buffers (1, 3, 1, 1), registered in __init__
    shift: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        spec: EncoderSpec,
        fingerprint: str,
        *,
        tta: str | None = None,
        stain_norm: StainNormalizer | None = None,
    ) -> None:
        super().__init__()
        if stain_norm is not None and not isinstance(stain_norm, StainNormalizer):
            raise TypeError(
                f"stain_norm must be a StainNormalizer (see fit_stain_normalizer), got {type(stain_norm).__name__}."
            )
        self.backbone = backbone
        self.spec = spec
        self.name = spec.name
        self.embed_dim = int(spec.embed_dim)
        self.tta = check_tta(tta)
        self.stain_norm = stain_norm
        self.base_fingerprint = fingerprint
        self.fingerprint = _transformed_fingerprint(fingerprint, spec.name, self.tta, stain_norm)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x / 255 normalised: (x / 255 - mean) / std = x * scale - shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)
        self._channels_last = spec.builder == "timm"
        self.requires_grad_(False)
        super().train(False)

    def with_transforms(self, tta: str | None = None, stain_norm: StainNormalizer | None = None) -> FrozenEncoder:
        """The same encoder with other tile transforms (sharing the backbone, on the same device).

        Parameters
        ----------
        tta
            ``"d4"``: each feature is the mean of the features of the tile's 8 dihedral transforms
            (rotations by 0, 90, 180 and 270 degrees, with and without a left-right mirror), 8 backbone
            passes per tile; :meth:`token_grid` maps every transform's grid back onto the tile before
            averaging, so cells stay where their tissue is. ``None``: no augmentation.
        stain_norm
            A :class:`~genedml_sd.encoders.StainNormalizer` applied to the tiles before anything else, or ``None``.

        Returns
        -------
        A new :class:`FrozenEncoder` whose :attr:`fingerprint` names the transforms (equal to
        :attr:`base_fingerprint` without any). The transforms replace this encoder's own; the
        encoder itself is unchanged.

        Raises
        ------
        ValueError
            Unknown ``tta``.
        TypeError
            ``stain_norm`` is not a :class:`~genedml_sd.encoders.StainNormalizer`.
        """
        out = FrozenEncoder(self.backbone, self.spec, self.base_fingerprint, tta=tta, stain_norm=stain_norm)
        return out.to(self.scale.device)

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
        Features (B, embed_dim), float32 (with ``tta="d4"``: the mean over the 8 transforms).
        """
        x = self._prepare(x)
        out = self._pooled(x)
        if self.tta is None:
            return out
        for k, flip in D4[1:]:
            out = out + self._pooled(self._view(x, k, flip))
        return out / len(D4)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pool == "cls+mean":
            tokens = self._forward_features(x)
            n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=1)
        else:
            out = self.backbone(x)
        return out.float()

    @property
    def has_token_grid(self) -> bool:
        """Whether :meth:`token_grid` gives a spatial feature grid for this encoder.

        ``True`` for timm vision transformers (pools ``"token"``, ``"avg"`` and ``"cls+mean"``), timm
        CNNs with pool ``"avg"`` and custom encoders with pool ``"cls+mean"`` (whose timm-like
        ``forward_features`` gives the tokens); ``False`` for builtins (``stain-texture``) and other
        custom callables.
        """
        return self._grid_kind() is not None

    def _grid_kind(self) -> str | None:
        b = self.backbone
        if self.spec.builder == "builtin" or not callable(getattr(b, "forward_features", None)):
            return None
        if self.spec.pool == "cls+mean":
            return "vit"  # forward() itself pools the tokens of forward_features
        if self.spec.builder != "timm" or not callable(getattr(b, "forward_head", None)):
            return None  # forward() is only known to be forward_head(forward_features(x)) for timm models
        if hasattr(b, "num_prefix_tokens"):
            return "vit"
        return "cnn" if self.spec.pool == "avg" else None

    def token_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and the spatial token grid of tiles, from one forward pass.

        Parameters
        ----------
        x
            RGB tiles (B, 3, H, W), as for :meth:`forward`.

        Returns
        -------
        pooled
            Features (B, embed_dim), float32, equal to ``forward(x)``.
        grid
            Token grid (B, embed_dim, h, w), float32: cell ``(v, u)`` (row, column) describes the
            square of the tile centred at ``((u + 0.5) / w, (v + 0.5) / h)`` of its side (``x``, ``y``).
            Vision transformers: the patch tokens after the final norm (and the ``fc_norm`` of
            average-pooled models), prefix (class, register) tokens dropped, ``h = w = input_px /
            patch size`` (14 x 14 for a 224 px ViT-x/16 tile: 8 µm cells on a 112 µm tile); pool
            ``"cls+mean"``: each cell is the class token concatenated with that patch token. CNNs:
            the last feature map (7 x 7 for a 224 px ResNet-50 tile), whose mean is the pooled feature.
            With ``tta="d4"`` both are means over the 8 transforms of the tile, each transform's grid
            mapped back (inverse rotation and mirror) onto the tile first.

        Raises
        ------
        TypeError
            If the encoder has no token grid (see :attr:`has_token_grid`), or its features do not
            have the expected layout; the message names the encoder.
        """
        kind = self._grid_kind()
        if kind is None:
            raise TypeError(
                f"Encoder {self.name!r} (builder {self.spec.builder!r}, pool {self.spec.pool!r}) has no spatial "
                "token grid; use forward() (or a timm ViT / CNN encoder)."
            )
        x = self._prepare(x)
        if self.tta is None:
            return self._token_grid(x, kind)
        pooled, grid = self._token_grid(x, kind)
        for k, flip in D4[1:]:
            p, g = self._token_grid(self._view(x, k, flip), kind)
            pooled, grid = pooled + p, grid + dihedral_inverse(g, k, flip)
        return pooled / len(D4), grid / len(D4)

    def _token_grid(self, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._forward_features(x)
        if kind == "cnn":
            if feats.ndim != 4 or feats.shape[1] != self.embed_dim:
                raise TypeError(
                    f"Encoder {self.name!r}: forward_features gave {tuple(feats.shape)}, expected a feature map "
                    f"(B, {self.embed_dim}, h, w)."
                )
            pooled = self._forward_head(feats)
            return pooled.float(), feats.float()
        if feats.ndim != 3:
            raise TypeError(
                f"Encoder {self.name!r}: forward_features gave {tuple(feats.shape)}, expected tokens (B, n, C)."
            )
        n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        patch = feats[:, n_prefix:]
        h, w = self._patch_grid(patch.shape[1])
        if self.spec.pool == "cls+mean":
            pooled = torch.cat([feats[:, 0], patch.mean(1)], dim=1)
            patch = torch.cat([feats[:, :1].expand_as(patch), patch], dim=2)
        else:
            pooled = self._forward_head(feats)
            for name in ("fc_norm", "head"):  # what forward_head applies after pooling (identity when unused)
                layer = getattr(self.backbone, name, None)
                if isinstance(layer, nn.Module):
                    patch = layer(patch)
        if patch.shape[-1] != self.embed_dim:
            raise TypeError(f"Encoder {self.name!r}: tokens are {patch.shape[-1]}-d, features {self.embed_dim}-d.")
        grid = patch.reshape(patch.shape[0], h, w, patch.shape[-1]).permute(0, 3, 1, 2)
        return pooled.float(), grid.float()

    def _patch_grid(self, n: int) -> tuple[int, int]:
        size = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        if size is not None and len(size) == 2 and int(size[0]) * int(size[1]) == n:
            return int(size[0]), int(size[1])
        side = int(round(n**0.5))
        if side * side != n:
            raise TypeError(f"Encoder {self.name!r}: {n} patch tokens do not form a square grid.")
        return side, side

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stain-normalised (if set), resized and normalised float tiles (B, 3, input_px, input_px)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected tiles of shape (B, 3, H, W), got {tuple(x.shape)}.")
        if self.stain_norm is not None:
            x = self.stain_norm(x)
        return self._normalise(x)

    def _view(self, x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
        """One dihedral transform of normalised tiles, in the backbone's memory format."""
        y = dihedral(x, k, flip)
        return y.contiguous(memory_format=torch.channels_last) if self._channels_last else y.contiguous()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected tiles of shape (B, 3, H, W), got {tuple(x.shape)}.")
        x = x.to(device=self.scale.device, dtype=torch.float32)
        px = self.spec.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x = x * self.scale - self.shift
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # a timm backbone's method (nn.Module.__getattr__ is typed as returning Tensor | Module)
        return cast("Callable[[torch.Tensor], torch.Tensor]", self.backbone.forward_features)(x)

    def _forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return cast("Callable[[torch.Tensor], torch.Tensor]", self.backbone.forward_head)(feats)

    def extra_repr(self) -> str:
        out = f"name={self.name!r}, embed_dim={self.embed_dim}, fingerprint={self.fingerprint!r}"
        if self.tta is not None:
            out += f", tta={self.tta!r}"
        if self.stain_norm is not None:
            out += f", stain_norm={self.stain_norm.identity!r}"
        return out


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for encoding on ``device``: ``"auto"`` is bf16 (fp16 without bf16) on CUDA, none on the CPU."""
    if precision == "32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision in ("bf16", "auto"):
        dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    elif precision == "16":
        dtype = torch.float16
    else:
        raise ValueError(f"precision must be 'auto', '32', '16' or 'bf16', got {precision!r}.")
    return torch.autocast(device_type=device.type, dtype=dtype)
