"""``stain-texture-nuclei``: the offline descriptor plus segmented-nucleus morphometry and H&E histograms."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._builtin import EMBED_DIM as STAIN_TEXTURE_DIM
from ._builtin import StainTexture, _deconvolve, hed_from_rgb_matrix

VERSION = "stain-texture-nuclei-v1"
"""Version tag of the feature definition; part of the encoder fingerprint (bump on any change)."""

SEG_PX = 224
"""Side of the segmentation grid: a 112-µm tile at 0.5 µm/px."""

UM_PER_PX = 0.5
"""Pixel size of the segmentation grid (µm) for the default 112-µm tile; areas and distances use it."""

H_THRESHOLD_RANGE = (0.4, 1.0)
"""Per-tile Otsu threshold of the smoothed haematoxylin OD, clipped to this range (log10 OD units)."""

MIN_AREA_UM2 = 8.0
"""Smallest nucleus kept (µm²): smaller haematoxylin-rich components are noise or debris."""

LARGE_AREA_UM2 = 40.0
"""Nuclei above this area (µm²) count as large (enlarged, e.g. tumour nuclei)."""

CLUMP_AREA_UM2 = 150.0
"""Nuclei above this area (µm²) after splitting are clumps that could not be split (or dense aggregates)."""

MIN_SEPARATION_UM = 3.0
"""Least distance (µm) between the centres of two touching nuclei that the watershed splits."""

SMOOTH_UM = 1.0
"""Sigma (µm) of the Gaussian that smooths the haematoxylin channel before segmentation."""

HIST_BINS = 8
H_RANGE = (0.0, 1.2)
E_RANGE = (0.0, 0.6)

_MORPH_NAMES = (
    "count",
    "per_1e4um2_tissue",
    "area_frac_of_tissue",
    "area_mean",
    "area_std",
    "area_q10",
    "area_q50",
    "area_q90",
    "large_frac",
    "clump_area_frac",
    "eccentricity_mean",
    "eccentricity_std",
    "circularity_mean",
    "circularity_std",
    "major_axis_mean",
    "h_mean",
    "h_std",
    "nn_dist_mean",
    "nn_dist_median",
    "nn_dist_std",
)
MORPH_DIM = len(_MORPH_NAMES)
HIST_DIM = 2 * 2 * HIST_BINS
EMBED_DIM = STAIN_TEXTURE_DIM + MORPH_DIM + HIST_DIM
"""Number of features: the 87 of ``stain-texture``, 20 nucleus statistics and 32 histogram bins."""


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of standard deviation ``sigma`` samples (radius ``ceil(3 sigma)``)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D sample (the bin edge maximising the between-class variance).

    Returns the sample's minimum when it holds fewer than 2 distinct values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))]) if bins > 1 else lo


def split_touching(mask: np.ndarray, um_per_px: float = UM_PER_PX) -> tuple[np.ndarray, int]:
    """Label the nuclei of a binary mask, splitting touching ones: (labels (H, W) int32, count).

    A marker-based watershed on the Euclidean distance to the background: markers are the regional
    maxima of that distance in windows of :data:`MIN_SEPARATION_UM` radius, so two round nuclei that
    touch become two labels while an elongated one mostly stays one. Labels are ``1..count``.
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), 0
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    size = 2 * max(1, int(round(MIN_SEPARATION_UM / um_per_px))) + 1
    peaks = (distance == ndimage.maximum_filter(distance, size=size)) & (distance >= 2)
    markers, n = ndimage.label(peaks, structure=np.ones((3, 3), dtype=bool))  # a plateau is one marker
    labels = watershed(-distance, markers, mask=mask).astype(np.int32) if n else np.zeros(mask.shape, np.int32)
    missing = mask & (labels == 0)  # components too thin for a marker keep their own label
    if missing.any():
        extra, n_extra = ndimage.label(missing, structure=np.ones((3, 3), dtype=bool))
        labels = np.where(missing, extra + n, labels).astype(np.int32)
        n += n_extra
    return labels, int(n)


@cache
def _pixel_moments(shape: tuple[int, int]) -> tuple[tuple[str, np.ndarray], ...]:
    """Per-pixel x, y, x², y², xy (flattened) of a grid, for the per-nucleus moments."""
    yy, xx = (a.ravel() for a in np.indices(shape, dtype=np.float64))
    return (("x", xx), ("y", yy), ("xx", xx * xx), ("yy", yy * yy), ("xy", xx * yy))


def nucleus_statistics(h: np.ndarray, tissue: np.ndarray, um_per_px: float = UM_PER_PX) -> np.ndarray:
    """Morphometry of the nuclei of one tile, float32 (20,), from its smoothed haematoxylin OD.

    Nuclei are the pixels with ``h > t``, ``t`` the tile's Otsu threshold of ``h`` over tissue pixels
    clipped to :data:`H_THRESHOLD_RANGE`, split into nuclei by :func:`split_touching`, of at least
    :data:`MIN_AREA_UM2`. Per nucleus:
    area, centroid and second moments (eccentricity and major axis of the equivalent ellipse),
    circularity ``4 pi area / perimeter^2`` (perimeter = boundary pixels x pixel size, so a disc of a few
    pixels scores near 1 and an elongated or ragged shape lower), mean ``h``. The tile's features, in
    order: count, count per 10^4 µm² of tissue, nuclear area fraction of tissue, area mean / std /
    10-50-90 % quantiles (µm²), fraction of large nuclei (> :data:`LARGE_AREA_UM2`), area fraction in
    clumps (> :data:`CLUMP_AREA_UM2`), eccentricity mean / std, circularity mean / std, major axis mean
    (µm), mean and std over nuclei of the nuclear ``h``, and nearest-neighbour centroid distance mean /
    median / std (µm; the tile side when there are fewer than 2 nuclei). Statistics of an empty tile are 0.

    Parameters
    ----------
    h
        Smoothed haematoxylin optical density (H, W), float.
    tissue
        Tissue mask (H, W), bool.
    um_per_px
        Pixel size in µm.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    h = np.asarray(h, dtype=np.float64)
    out = np.zeros(MORPH_DIM, dtype=np.float64)
    px_area = um_per_px**2
    tissue_area = float(tissue.sum()) * px_area
    side_um = max(h.shape) * um_per_px
    out[17:20] = (side_um, side_um, 0.0)
    if tissue.sum() < 16:
        return out.astype(np.float32)
    t = float(np.clip(otsu_threshold(h[tissue]), *H_THRESHOLD_RANGE))
    mask = h > t
    labels, n = split_touching(mask, um_per_px)
    if n == 0:
        return out.astype(np.float32)
    idx = labels.ravel()
    area_px = np.bincount(idx, minlength=n + 1)[1:].astype(np.float64)
    keep = area_px * px_area >= MIN_AREA_UM2
    if not keep.any():
        return out.astype(np.float32)
    sums = {
        name: np.bincount(idx, weights=values, minlength=n + 1)[1:]
        for name, values in (*_pixel_moments(h.shape), ("h", h.ravel()))
    }
    boundary = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0)
    perim_px = np.bincount(idx, weights=boundary.ravel().astype(np.float64), minlength=n + 1)[1:]
    a = area_px[keep]
    cx, cy = sums["x"][keep] / a, sums["y"][keep] / a
    vxx = np.maximum(sums["xx"][keep] / a - cx**2, 0) + 1.0 / 12  # + the variance of a pixel
    vyy = np.maximum(sums["yy"][keep] / a - cy**2, 0) + 1.0 / 12
    vxy = sums["xy"][keep] / a - cx * cy
    spread = np.sqrt(((vxx - vyy) / 2) ** 2 + vxy**2)
    lam1, lam2 = (vxx + vyy) / 2 + spread, np.maximum((vxx + vyy) / 2 - spread, 1e-12)
    ecc = np.sqrt(np.clip(1 - lam2 / lam1, 0, 1))
    major_um = 4 * np.sqrt(lam1) * um_per_px
    area_um = a * px_area
    perim_um = np.maximum(perim_px[keep], 1) * um_per_px
    circ = np.clip(4 * np.pi * area_um / perim_um**2, 0, 1.5)
    h_nuc = sums["h"][keep] / a
    count = float(keep.sum())
    out[0] = count
    out[1] = count / max(tissue_area, 1.0) * 1e4
    out[2] = float(area_um.sum()) / max(tissue_area, 1.0)
    out[3], out[4] = area_um.mean(), area_um.std()
    out[5:8] = np.quantile(area_um, [0.1, 0.5, 0.9])
    out[8] = float((area_um > LARGE_AREA_UM2).mean())
    out[9] = float(area_um[area_um > CLUMP_AREA_UM2].sum() / area_um.sum())
    out[10], out[11] = ecc.mean(), ecc.std()
    out[12], out[13] = circ.mean(), circ.std()
    out[14] = major_um.mean()
    out[15], out[16] = h_nuc.mean(), h_nuc.std()
    if count >= 2:
        centres = np.stack([cx, cy], axis=1) * um_per_px
        dist, _ = cKDTree(centres).query(centres, k=2)
        nn = dist[:, 1]
        out[17:20] = (nn.mean(), np.median(nn), nn.std())
    return out.astype(np.float32)


def stain_histograms(h: torch.Tensor, e: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """Histograms of haematoxylin and eosin OD over tissue pixels, whole tile and centre half, (B, 32).

    Each histogram has :data:`HIST_BINS` equal bins over :data:`H_RANGE` / :data:`E_RANGE` (values beyond
    fall in the end bins) and sums to 1 over a tile's tissue pixels (all zeros without tissue). Order:
    whole-tile H, whole-tile E, centre H, centre E.
    """
    side = h.shape[-1]
    lo, hi = side // 4, side - side // 4
    feats = []
    for crop in (slice(None), slice(lo, hi)):
        m = tissue[..., crop, crop].flatten(1).float()
        for chan, (vmin, vmax) in ((h, H_RANGE), (e, E_RANGE)):
            v = chan[..., crop, crop].flatten(1)
            b = ((v - vmin) / (vmax - vmin) * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
            b = b + HIST_BINS * torch.arange(v.shape[0], device=v.device)[:, None]  # one bin range per tile
            counts = torch.bincount(b.ravel(), weights=m.ravel(), minlength=v.shape[0] * HIST_BINS)
            counts = counts.view(v.shape[0], HIST_BINS).float()
            feats.append(counts / counts.sum(1, keepdim=True).clamp(min=1.0))
    return torch.cat(feats, dim=1)


class StainTextureNuclei(nn.Module):
    """``stain-texture`` plus nucleus morphometry and multi-scale H&E histograms (139 features).

    Also weight-free and deterministic. The first 87 features are exactly those of
    :class:`~genedml_sd.encoders.StainTexture`. Then, from the tile at 0.5 µm/px (224 px for the default
    112 µm tile; other sizes are resampled to 224 px), deconvolved into haematoxylin (H) and eosin (E)
    optical density:

    ``nuclei`` (20)
        Nuclei segmented in the H channel smoothed with a Gaussian of sigma 1 µm (per-tile Otsu threshold
        over tissue, touching nuclei split by a distance-transform watershed, at least 8 µm²) and their statistics: count and density,
        area distribution, large-nucleus fraction, clumps, shape (eccentricity, circularity, major axis),
        chromatin (mean H per nucleus) and spacing (nearest-neighbour distance); see
        :func:`nucleus_statistics`. The segmentation runs on the CPU (scipy, scikit-image), tile by tile.
    ``histogram`` (32)
        8-bin histograms of H and E over tissue pixels, of the whole tile and of its centre half
        (:func:`stain_histograms`).

    All features are finite for any input, including white or black tiles.
    """

    version = VERSION
    embed_dim = EMBED_DIM
    hed_matrix: torch.Tensor
    kernel: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.texture = StainTexture()
        self.register_buffer("hed_matrix", hed_from_rgb_matrix().float(), persistent=False)
        self.register_buffer("kernel", gaussian_kernel(SMOOTH_UM / UM_PER_PX), persistent=False)

    def smooth(self, h: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur (sigma :data:`SMOOTH_UM`, reflect boundary) of (B, H, W) images."""
        k = self.kernel
        r = k.numel() // 2
        x = F.pad(h[:, None], (r, r, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of RGB tiles: float tensor (B, 3, H, W) in ``[0, 1]`` -> float32 (B, 139)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().clamp(0.0, 1.0)
            base = self.texture(x)
            seg = x if x.shape[-2:] == (SEG_PX, SEG_PX) else F.interpolate(x, size=(SEG_PX, SEG_PX), mode="area")
            od = -torch.log10(seg.clamp(min=1.0 / 255.0))
            hed = _deconvolve(od, self.hed_matrix)
            h, e = hed[:, 0], hed[:, 1]
            tissue = od.sum(1) > 0.2
            h_smooth = self.smooth(h)
            h_np, t_np = h_smooth.cpu().numpy(), tissue.cpu().numpy()
            morph = np.stack([nucleus_statistics(h_np[i], t_np[i]) for i in range(x.shape[0])])
            hist = stain_histograms(h, e, tissue)
            return torch.cat([base, torch.from_numpy(morph).to(x.device), hist], dim=1)


@cache
def feature_names() -> tuple[str, ...]:
    """Names of the ``stain-texture-nuclei`` features, in output order (``group/name``)."""
    from ._builtin import feature_names as texture_names

    hist = [f"histogram/{scale}_{c}_bin{b}" for scale in ("tile", "centre") for c in ("h", "e") for b in range(8)]
    return (*texture_names(), *(f"nuclei/{n}" for n in _MORPH_NAMES), *hist)
