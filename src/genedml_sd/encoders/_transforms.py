"""Tile transforms that are part of an encoder's identity: dihedral test-time augmentation and stain normalisation.

Stain normalisation maps the colours of H&E tiles onto those of a reference tile, by one of

- Reinhard et al. (2001), "Color transfer between images": per-channel mean and standard
  deviation matching, here in CIELAB (as HistomicsTK, StainTools and torchstain do, instead of the
  paper's lαβ space);
- Macenko et al. (2009), "A method for normalizing histology slides for quantitative analysis":
  stain vectors from the robust extreme angles of the optical densities in their principal plane,
  stain concentrations by least squares, rescaled to the reference's 99th percentiles.

Both are implemented here in batched torch (tiles stay on the encoder's device); torchstain
(https://github.com/EIDOSLAB/torchstain) processes one image at a time and fails on tiles without
tissue, which feature extraction meets at every tissue edge.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import torch

TTA_MODES = ("d4",)
"""Test-time augmentations: ``"d4"``, the mean over the 8 rotations by multiples of 90° and their mirror images."""

D4: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))
"""The dihedral group of the square as ``(k, flip)``: mirror left-right if ``flip``, then rotate ``k`` quarter turns."""

STAIN_METHODS = ("macenko", "reinhard")
STAIN_VERSION = "v1"
"""Version of the stain-normalisation definitions; part of :attr:`StainNormalizer.identity` (bump on any change)."""

_CHUNK = 64  # tiles normalised at once (bounds the (chunk, 3, H * W) float temporaries)
_MIN_PIXELS = 64  # fewer tissue pixels than this: a tile is left as it is

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, and the D65 white point (the constants scikit-image uses)
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


# --------------------------------------------------------------------------------------------- dihedral


def check_tta(tta: str | None) -> str | None:
    """Validate a test-time augmentation name: ``None`` (or ``"none"``) or one of :data:`TTA_MODES`."""
    if tta is None or tta == "none":
        return None
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be None or one of {list(TTA_MODES)}, got {tta!r}.")
    return tta


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Apply one element of :data:`D4` to the last two (row, column) dimensions of ``x``.

    Parameters
    ----------
    x
        Tensor (..., H, W).
    k
        Quarter turns (``torch.rot90`` direction, from the row axis to the column axis).
    flip
        Mirror the columns first.

    Returns
    -------
    The transformed tensor, (..., H, W) (or (..., W, H) for odd ``k``).
    """
    y = x.flip(-1) if flip else x
    return torch.rot90(y, k, dims=(-2, -1)) if k % 4 else y


def dihedral_inverse(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo :func:`dihedral` with the same ``(k, flip)``: ``dihedral_inverse(dihedral(x, k, f), k, f) == x``."""
    x = torch.rot90(y, -k, dims=(-2, -1)) if k % 4 else y
    return x.flip(-1) if flip else x


# --------------------------------------------------------------------------------------------- colour


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB values in ``[0, 1]``, channels on dimension 1.

    Parameters
    ----------
    rgb
        Float tensor (B, 3, ...).

    Returns
    -------
    Float tensor (B, 3, ...): L in ``[0, 100]``, a and b; equal to :func:`skimage.color.rgb2lab`.
    """
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("dc,bc...->bd...", m, lin) / white.view(1, 3, *([1] * (rgb.ndim - 2)))
    f = torch.where(xyz > _DELTA**3, xyz.clamp(min=_DELTA**3) ** (1.0 / 3.0), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Clipped sRGB in ``[0, 1]`` of CIELAB (D65) values, channels on dimension 1; inverse of :func:`rgb_to_lab`."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], dim=1)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    white = torch.tensor(_D65, dtype=lab.dtype, device=lab.device)
    m_inv = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    lin = torch.einsum("dc,bc...->bd...", m_inv, xyz * white.view(1, 3, *([1] * (lab.ndim - 2)))).clamp(min=0.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def _od(rgb255: torch.Tensor, io: float) -> torch.Tensor:
    """Optical density ``-ln((I + 1) / io)`` of intensities in ``[0, 255]`` (negative above ``io - 1``)."""
    return -torch.log((rgb255 + 1.0) / io)


def _masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Nearest-rank ``q``-quantile along the last dimension over the entries where ``mask`` is true.

    ``values`` (..., N), ``mask`` (B, N) broadcastable; every row needs at least one true entry.
    """
    mask = mask.expand_as(values)
    n = mask.sum(-1, keepdim=True)
    srt = torch.where(mask, values, torch.full_like(values, math.inf)).sort(dim=-1).values
    k = torch.round(q * (n - 1).to(values.dtype)).long()
    return srt.gather(-1, k).squeeze(-1)


# --------------------------------------------------------------------------------------------- normaliser


@dataclass(frozen=True)
class StainNormalizer:
    """A stain normalisation fitted on a reference tile.

    Make one with :func:`~genedml_sd.encoders.fit_stain_normalizer`.

    Call it on uint8 RGB tiles (B, 3, H, W) to get them with the reference's colours, uint8 of the
    same shape on the same device. Tiles with too little tissue (see ``min_tissue``), and for
    Macenko uniform tiles (no stain plane), are returned unchanged; Reinhard shifts a flat channel
    to the reference mean without scaling it. Its :attr:`identity` is part of the fingerprint of an encoder using it
    (:meth:`FrozenEncoder.with_transforms`), so features of other references are never mixed up in
    the cache; :meth:`to_dict` / :meth:`from_dict` store and rebuild it without the reference tile.

    Attributes
    ----------
    method
        ``"macenko"`` or ``"reinhard"``.
    params
        Fitted reference parameters (rounded to 6 significant digits). Reinhard: the LAB channel
        means then standard deviations over all pixels (L, a, b, sd L, sd a, sd b). Macenko: the
        haematoxylin then eosin unit stain vectors in RGB optical density (3 + 3), then their 99th
        percentile concentrations (2).
    options
        ``beta`` (optical density below which, in some channel, a pixel is background; both
        methods), ``min_tissue`` (tissue fraction below which a tile is left unchanged), and for
        Macenko ``io`` (transmitted light intensity, 0..255) and ``alpha`` (angle percentile, %).
    """

    method: str
    params: tuple[float, ...]
    options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise ValueError(f"method must be one of {list(STAIN_METHODS)}, got {self.method!r}.")
        n = 8 if self.method == "macenko" else 6
        if len(self.params) != n or not all(math.isfinite(float(p)) for p in self.params):
            raise ValueError(f"A {self.method} normaliser needs {n} finite parameters, got {self.params!r}.")
        object.__setattr__(self, "params", tuple(float(p) for p in self.params))
        object.__setattr__(self, "options", {**_default_options(self.method), **dict(self.options)})

    @property
    def identity(self) -> str:
        """Stable identity ``"<method>-<version>:<sha256 prefix>"`` of the method, options and fitted parameters."""
        payload = json.dumps(self.to_dict(), sort_keys=True)
        return f"{self.method}-{STAIN_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (method, version, parameters, options); :meth:`from_dict` rebuilds it."""
        return {
            "method": self.method,
            "version": STAIN_VERSION,
            "params": list(self.params),
            "options": dict(sorted(self.options.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser from :meth:`to_dict`; raises ``ValueError`` for another definition version."""
        if d.get("version", STAIN_VERSION) != STAIN_VERSION:
            raise ValueError(
                f"Stain normaliser of version {d.get('version')!r}; this genedml-sd defines {STAIN_VERSION!r}."
            )
        return cls(str(d["method"]), tuple(d["params"]), dict(d.get("options", {})))

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """Normalise tiles.

        Parameters
        ----------
        tiles
            RGB tiles (B, 3, H, W), ``uint8`` or float in ``[0, 255]``.

        Returns
        -------
        uint8 tiles (B, 3, H, W) on the same device.
        """
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"Expected tiles of shape (B, 3, H, W), got {tuple(tiles.shape)}.")
        out = torch.empty(tiles.shape, dtype=torch.uint8, device=tiles.device)
        with torch.autocast(device_type=tiles.device.type, enabled=False):
            for s in range(0, tiles.shape[0], _CHUNK):
                x = tiles[s : s + _CHUNK].float().clamp(0.0, 255.0)
                out[s : s + _CHUNK] = self._normalise(x.flatten(2)).round().clamp(0, 255).to(torch.uint8).view_as(x)
        return out

    def __hash__(self) -> int:
        return hash(self.identity)

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, identity={self.identity!r})"

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Float tiles (b, 3, N) in [0, 255] -> normalised float (b, 3, N); background tiles unchanged."""
        opt = self.options
        od = _od(x, float(opt.get("io", 255.0)))
        tissue = (od >= opt["beta"]).all(1)  # (b, N)
        n = tissue.sum(1)
        ok = (n >= max(_MIN_PIXELS, opt["min_tissue"] * x.shape[-1])).nonzero().flatten()
        out = x.clone()
        if len(ok):
            sub = _macenko(x[ok], od[ok], tissue[ok], self) if self.method == "macenko" else _reinhard(x[ok], self)
            out[ok] = sub
        return out


def _default_options(method: str) -> dict[str, float]:
    opts = {"beta": 0.15, "min_tissue": 0.01}
    if method == "macenko":
        opts |= {"io": 240.0, "alpha": 1.0}
    return opts


def _reinhard(x: torch.Tensor, norm: StainNormalizer) -> torch.Tensor:
    lab = rgb_to_lab(x / 255.0)
    mu, sd = lab.mean(-1, keepdim=True), lab.std(-1, keepdim=True)
    p = torch.tensor(norm.params, dtype=x.dtype, device=x.device)
    mu_t, sd_t = p[:3].view(1, 3, 1), p[3:].view(1, 3, 1)
    scale = torch.where(sd > 1e-3, sd_t / sd.clamp(min=1e-3), torch.ones_like(sd))  # a flat channel is only shifted
    return lab_to_rgb((lab - mu) * scale + mu_t) * 255.0


def _stain_matrix(od: torch.Tensor, tissue: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko stain vectors (b, 3, 2), haematoxylin first, from optical densities (b, 3, N) of tissue pixels.

    Also returns whether the tissue colours span a plane (b,) (not for a uniform tile).
    """
    # the stain model od = stains @ concentrations is a plane through the origin: the paper's SVD of the
    # optical densities themselves (uncentred second moments), not of their covariance
    w = tissue.to(od.dtype).unsqueeze(1)
    second = (od * w) @ od.transpose(1, 2) / w.sum(-1, keepdim=True).clamp(min=1)
    vals, vecs = torch.linalg.eigh(second.double())  # ascending eigenvalues
    spans = vals[:, 1] > 1e-8 * vals[:, 2].clamp(min=1e-12) + 1e-12
    vecs = vecs.to(od.dtype)
    # the principal plane: first and second directions, oriented so that the stains have positive components
    v1, v2 = vecs[..., 2], vecs[..., 1]
    v1 = v1 * torch.where(v1.sum(-1, keepdim=True) < 0, -1.0, 1.0)
    v2 = v2 * torch.where(v2[:, :1] < 0, -1.0, 1.0)
    phi = torch.atan2(torch.einsum("bc,bcn->bn", v2, od), torch.einsum("bc,bcn->bn", v1, od))
    lo = _masked_quantile(phi, tissue, alpha / 100.0)
    hi = _masked_quantile(phi, tissue, 1.0 - alpha / 100.0)
    s_lo = torch.cos(lo)[:, None] * v1 + torch.sin(lo)[:, None] * v2
    s_hi = torch.cos(hi)[:, None] * v1 + torch.sin(hi)[:, None] * v2
    h_first = (s_lo[:, 0] >= s_hi[:, 0])[:, None]  # haematoxylin absorbs more red light than eosin
    h, e = torch.where(h_first, s_lo, s_hi), torch.where(h_first, s_hi, s_lo)
    return torch.stack([h, e], dim=2), spans


def _concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (b, 2, N) of optical densities (b, 3, N) for stain vectors (b, 3, 2)."""
    return torch.linalg.pinv(stains) @ od


def _macenko(x: torch.Tensor, od: torch.Tensor, tissue: torch.Tensor, norm: StainNormalizer) -> torch.Tensor:
    opt = norm.options
    stains, spans = _stain_matrix(od, tissue, opt["alpha"])
    conc = _concentrations(od, stains)
    max_c = _masked_quantile(conc, tissue.unsqueeze(1), 0.99).clamp(min=1e-6)  # (b, 2)
    p = torch.tensor(norm.params, dtype=x.dtype, device=x.device)
    ref_stains, ref_max = p[:6].view(2, 3).T, p[6:]
    od_new = ref_stains @ (conc * (ref_max / max_c).unsqueeze(-1))
    return torch.where(spans.view(-1, 1, 1), opt["io"] * torch.exp(-od_new) - 1.0, x)  # uniform tiles: unchanged


# --------------------------------------------------------------------------------------------- fitting


def _round(values: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(f"{float(v):.6g}") for v in values.flatten())


def fit_stain_normalizer(
    reference_tile: np.ndarray | str | PathLike,
    method: str = "macenko",
    *,
    beta: float = 0.15,
    min_tissue: float = 0.01,
    io: float = 240.0,
    alpha: float = 1.0,
) -> StainNormalizer:
    """Fit a stain normaliser on a reference H&E tile.

    Parameters
    ----------
    reference_tile
        The reference: an RGB image (H, W, 3) uint8 (e.g. a well-stained tile of the training
        slides), or the path of an image file (read with Pillow, converted to RGB).
    method
        ``"macenko"`` (Macenko et al. 2009: stain vectors and concentrations) or ``"reinhard"``
        (Reinhard et al. 2001: CIELAB channel means and standard deviations, over all pixels).
    beta
        Background threshold: a pixel is tissue when its optical density ``-ln((I + 1) / io)`` is
        at least ``beta`` in every channel (``io = 255`` for Reinhard, which only uses it to tell
        tissue tiles).
    min_tissue
        Tiles whose tissue fraction is below this (or with fewer than 64 tissue pixels) are left
        unchanged when normalising.
    io
        Macenko: transmitted light intensity (0..255).
    alpha
        Macenko: percentile (%) of the stain angles taken as the extreme stain directions.

    Returns
    -------
    The fitted :class:`~genedml_sd.encoders.StainNormalizer`.

    Raises
    ------
    ValueError
        Unknown ``method``; a reference that is not (H, W, 3) uint8, smaller than 16 x 16 px, or
        with less than 5 % tissue (blank glass, background).
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"method must be one of {list(STAIN_METHODS)}, got {method!r}.")
    if isinstance(reference_tile, str | PathLike):
        from PIL import Image

        with Image.open(reference_tile) as im:
            reference_tile = np.asarray(im.convert("RGB"))
    ref = np.asarray(reference_tile)
    if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
        raise ValueError(
            f"reference_tile must be an RGB image (H, W, 3) of dtype uint8, got shape {ref.shape} dtype {ref.dtype}."
        )
    if min(ref.shape[:2]) < 16:
        raise ValueError(f"reference_tile is too small ({ref.shape[0]} x {ref.shape[1]} px); use at least 16 x 16.")
    options = {"beta": float(beta), "min_tissue": float(min_tissue)}
    if method == "macenko":
        options |= {"io": float(io), "alpha": float(alpha)}
    x = torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1))).double().flatten(1)[None]  # (1, 3, N)
    od = _od(x, options.get("io", 255.0))
    tissue = (od >= beta).all(1)
    frac = float(tissue.double().mean())
    if frac < 0.05 or int(tissue.sum()) < _MIN_PIXELS:
        raise ValueError(
            f"reference_tile is {100 * frac:.1f} % tissue (optical density >= {beta} in every channel); "
            "choose a reference tile that is mostly tissue."
        )
    if method == "reinhard":
        lab = rgb_to_lab(x / 255.0)
        params = _round(torch.cat([lab.mean(-1)[0], lab.std(-1)[0]]))
    else:
        stains, spans = _stain_matrix(od, tissue, alpha)
        max_c = _masked_quantile(_concentrations(od, stains), tissue.unsqueeze(1), 0.99)
        if not bool(spans.all() and (max_c > 1e-6).all() and torch.isfinite(stains).all()):
            raise ValueError("reference_tile: no two stains could be separated (is it an H&E tile with tissue?).")
        params = _round(torch.cat([stains[0].T.flatten(), max_c[0]]))
    return StainNormalizer(method, params, options)
