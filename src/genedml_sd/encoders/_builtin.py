"""``stain-texture``: a fully offline, weight-free H&E tile descriptor in pure, vectorised torch."""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

VERSION = "stain-texture-v1"
"""Version tag of the feature definition; part of the encoder fingerprint (bump on any change)."""

EMBED_DIM = 87
"""Number of features (see :func:`feature_names`)."""

WORK_PX = 112
"""Side of the working grid: a 224-px, 112-µm tile is average-pooled to 1 µm/px."""

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in RGB optical density;
# rows are normalised to unit length and the matrix is inverted, as in colour deconvolution.
_RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)

# Fixed thresholds in log10 optical-density units, calibrated on HER2ST H&E tiles.
T_BACKGROUND = 0.2  # summed RGB OD below: glass / background
T_PALE = 0.4  # summed RGB OD below: pale tissue (loose stroma, fat) or background
T_DARK = 1.5  # summed RGB OD above: very dark (dense nuclei, folds, ink)
T_TISSUE = T_BACKGROUND  # tissue = not background
T_H = 0.35  # haematoxylin OD above: nuclear (purple/blue) pixel
T_H_HIGH = 0.7  # haematoxylin OD above: dense chromatin
T_E = 0.06  # eosin OD above (with low haematoxylin): eosinophilic pixel (stroma, cytoplasm)
_EPS = 1e-6
_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def hed_from_rgb_matrix() -> torch.Tensor:
    """The 3 x 3 matrix mapping RGB optical density to (H, E, DAB) optical density (row vectors).

    Returns
    -------
    float64 tensor ``M`` such that ``hed = od_rgb @ M`` for row vectors ``od_rgb``.
    """
    rgb_from_hed = torch.tensor(_RGB_FROM_HED, dtype=torch.float64)
    rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
    return torch.linalg.inv(rgb_from_hed)


def rgb_to_hed(rgb: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Colour deconvolution of RGB in ``[0, 1]`` into H, E and DAB optical densities.

    Parameters
    ----------
    rgb
        Float tensor (B, 3, H, W) with values in ``[0, 1]``.
    matrix
        Deconvolution matrix (default :func:`hed_from_rgb_matrix`).

    Returns
    -------
    Float tensor (B, 3, H, W): haematoxylin, eosin and DAB optical density in log10 units,
    clipped at 0. Equals ``6 * skimage.color.rgb2hed`` up to the clipping of dark pixels
    (here at 1/255 instead of 1e-6).
    """
    if matrix is None:
        matrix = hed_from_rgb_matrix()
    od = -torch.log10(rgb.float().clamp(min=1.0 / 255.0))
    return _deconvolve(od, matrix.to(device=rgb.device, dtype=torch.float32))


def _deconvolve(od: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,cd->bdhw", od, matrix).clamp(min=0.0)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices into ``[0, n)`` without repeating the edge (torch's ``reflect`` padding)."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def gaussian_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) matrix of a 1-D Gaussian blur (radius ``ceil(3 sigma)``) with reflect boundary.

    Parameters
    ----------
    n
        Signal length.
    sigma
        Standard deviation in samples.

    Returns
    -------
    Float32 matrix ``G`` such that ``G @ x`` blurs the columns of ``x``.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    rows = torch.arange(n).repeat_interleave(t.numel())
    cols = _reflect(rows + t.long().repeat(n), n)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows, cols), k.repeat(n), accumulate=True)
    return m.float()


def box_matrix(n: int, k: int) -> torch.Tensor:
    """(n, n) matrix of a 1-D moving average over ``k`` (odd) samples, truncated at the borders.

    Parameters
    ----------
    n
        Signal length.
    k
        Window length (odd).

    Returns
    -------
    Float32 matrix whose rows average the in-bounds samples of each window.
    """
    i = torch.arange(n)
    m = ((i[:, None] - i[None, :]).abs() <= k // 2).double()
    return (m / m.sum(1, keepdim=True)).float()


def _filter(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Separable 2-D filter of (..., n, n) with the 1-D filter matrix ``m`` along both axes."""
    return torch.matmul(torch.matmul(m, x), m.T)


def _max_filter_1d(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Running maximum over ``k`` (odd) samples along ``dim`` (-1 or -2), same size (log-step doubling)."""
    r = k // 2
    y = F.pad(x, (r, r, 0, 0) if dim == -1 else (0, 0, r, r), value=float("-inf"))
    w = 1
    while 2 * w <= k:
        n = y.shape[dim] - w
        y = torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, w, n))
        w *= 2
    if w < k:
        n = y.shape[dim] - (k - w)
        y = torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, k - w, n))
    return y


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Running maximum over k x k windows of (..., h, w) (same size, borders truncated)."""
    return _max_filter_1d(_max_filter_1d(x, k, -1), k, -2)


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (normalised by 8) of (..., h, w) with replicate boundary: (d/dx, d/dy)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    sy = p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]  # smooth along y
    sx = p[..., :, :-2] + 2.0 * p[..., :, 1:-1] + p[..., :, 2:]  # smooth along x
    gx = (sy[..., :, 2:] - sy[..., :, :-2]) / 8.0
    gy = (sx[..., 2:, :] - sx[..., :-2, :]) / 8.0
    return gx, gy


def _gname(n: int, sigma: float) -> str:
    return f"gauss{n}_{round(10 * sigma)}"


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, ...) over all but the first axis where ``mask`` (same shape, float) is 1; 0 if empty."""
    return (values * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) + _EPS)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and per-channel mean and std of (B, C, H, W): two (B, C) tensors."""
    flat = x.flatten(2)
    mean = flat.mean(2)
    std = (flat.square().mean(2) - mean.square()).clamp(min=0.0).sqrt()
    return mean, std


class StainTexture(nn.Module):
    """Hand-crafted H&E descriptor: colour deconvolution, composition, texture and nuclear statistics.

    No weights, no downloads: a fixed, deterministic function of the pixels, written in vectorised
    torch so that it runs on CPU (hundreds of tiles/s) or GPU. The input tile (RGB in ``[0, 1]``,
    112 µm at 224 px by default) is average-pooled to a 112 x 112 working grid (~1 µm/px) and
    deconvolved into haematoxylin (H), eosin (E) and DAB optical densities (log10 units) with the
    Ruifrok & Johnston stain matrix (as :func:`skimage.color.rgb2hed`, times 6). Features, in
    output order (:func:`feature_names` gives their names; 87 in all):

    ``colour`` (35)
        RGB mean and std (6); mean RGB optical density over tissue pixels (3); mean, std and
        10/25/50/75/90 % quantiles (on the 2 µm/px grid) of H, E and summed RGB optical density (21);
        DAB mean and std (2); mean H and E over tissue pixels and the haematoxylin share ``H / (H + E)`` over tissue (3).
    ``composition`` (7)
        Fractions of background (summed OD < 0.2), pale (< 0.4) and very dark (> 1.5) pixels,
        of haematoxylin-rich pixels (H > 0.35, a nuclei proxy) and dense-chromatin pixels
        (H > 0.7), of eosinophilic pixels (E > 0.06 and H <= 0.35), and the haematoxylin-rich share
        of tissue.
    ``texture`` (26)
        Sobel gradient magnitude of H and E at 1, 2 and 4 µm/px: mean and std (12); mean absolute
        grey-level difference of H and E at offsets 1, 2, 4 and 8 µm, averaged over the horizontal
        and vertical directions (8); mean local standard deviation of H and E in 5 x 5 and 9 x 9 µm
        windows (4); energy-weighted structure-tensor coherence of H and E at 2 µm (2: fibre
        alignment of stroma).
    ``blobs`` (6)
        Difference-of-Gaussians (sigma, 1.6 sigma) response of H for sigma = 1.5, 3 and 6 µm (nuclei
        and nuclear clusters): mean of the positive part and std.
    ``nuclei`` (4)
        Nuclear-density proxies from local maxima of the smoothed H channel (sigma 1.5 µm, with a
        small prominence over the local mean): peaks per 10^4 µm^2 above H 0.35 and above 0.7 in
        7 x 7 µm windows, above 0.35 in 11 x 11 µm windows, and mean H at the peaks.
    ``heterogeneity`` (9)
        Std, min and max over a 4 x 4 grid of tile cells of the cell-mean H, E and tissue fraction
        (orientation-free layout statistics).

    All features are finite for any input (including uniformly white or black tiles); they are
    invariant to flips and 90° rotations of the tile up to boundary effects. Their scales differ,
    so standardise them before use.
    """

    version = VERSION
    embed_dim = EMBED_DIM
    hed_matrix: torch.Tensor  # buffer (3, 3), registered in __init__

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hed_matrix", hed_from_rgb_matrix().float(), persistent=False)
        # 1-D filter matrices (applied along both axes): Gaussians on the 112/56/28 grids, boxes on 112
        for n in (WORK_PX, WORK_PX // 2, WORK_PX // 4):
            for sigma in (1.5, 2.4):
                self.register_buffer(_gname(n, sigma), gaussian_matrix(n, sigma), persistent=False)
        self.register_buffer(_gname(WORK_PX, 2.0), gaussian_matrix(WORK_PX, 2.0), persistent=False)
        for k in (5, 7, 9, 11):
            self.register_buffer(f"box{k}", box_matrix(WORK_PX, k), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of RGB tiles.

        Parameters
        ----------
        x
            Float tensor (B, 3, H, W) with values in ``[0, 1]``.

        Returns
        -------
        Float32 tensor (B, 87).
        """
        return torch.cat([v for _, v in self.named_features(x)], dim=1)

    @torch.no_grad()
    def named_features(self, x: torch.Tensor) -> list[tuple[list[str], torch.Tensor]]:
        """Feature groups as ``(names, values)`` pairs, values (B, k) float32; see the class docstring.

        Parameters
        ----------
        x
            Float tensor (B, 3, H, W) with values in ``[0, 1]``.

        Returns
        -------
        List of ``(names, values)``.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._named_features(x)

    def _named_features(self, x: torch.Tensor) -> list[tuple[list[str], torch.Tensor]]:
        x = x.float().clamp(0.0, 1.0).contiguous()
        if x.shape[-2:] != (WORK_PX, WORK_PX):
            x = F.adaptive_avg_pool2d(x, WORK_PX)
        out: list[tuple[list[str], torch.Tensor]] = []

        od = -torch.log10(x.clamp(min=1.0 / 255.0))  # (B, 3, h, w)
        hed = _deconvolve(od, self.hed_matrix)
        h, e, dab = hed[:, :1], hed[:, 1:2], hed[:, 2:3]
        odsum = od.sum(1, keepdim=True)
        tissue = (odsum > T_TISSUE).float()

        # --- colour
        rgb_mean, rgb_std = _mean_std(x)
        od_tissue = (od * tissue).flatten(2).sum(2) / (tissue.flatten(2).sum(2) + _EPS)
        out.append(([f"colour/{c}_mean" for c in "rgb"], rgb_mean))
        out.append(([f"colour/{c}_std" for c in "rgb"], rgb_std))
        out.append(([f"colour/od_{c}_tissue_mean" for c in "rgb"], od_tissue))
        chans = torch.cat([h, e, odsum], dim=1)  # (B, 3, h, w)
        c_mean, c_std = _mean_std(chans)
        sub = F.avg_pool2d(chans, 2).flatten(2)  # quantiles on the 2 µm/px grid (flip-symmetric)
        srt = sub.sort(dim=2).values
        n = srt.shape[2]
        qidx = torch.tensor([round(q * (n - 1)) for q in _QUANTILES], device=x.device)
        quant = srt.index_select(2, qidx)  # (B, 3, 5)
        for i, c in enumerate(("h", "e", "od")):
            names = [f"colour/{c}_mean", f"colour/{c}_std"] + [f"colour/{c}_q{round(q * 100)}" for q in _QUANTILES]
            out.append((names, torch.cat([c_mean[:, i : i + 1], c_std[:, i : i + 1], quant[:, i]], dim=1)))
        d_mean, d_std = _mean_std(dab)
        out.append((["colour/dab_mean", "colour/dab_std"], torch.cat([d_mean, d_std], dim=1)))
        h_t = _masked_mean(h, tissue)
        e_t = _masked_mean(e, tissue)
        out.append(
            (
                ["colour/h_tissue_mean", "colour/e_tissue_mean", "colour/h_share_tissue"],
                torch.stack([h_t, e_t, h_t / (h_t + e_t + _EPS)], dim=1),
            )
        )

        # --- composition
        def frac(mask: torch.Tensor) -> torch.Tensor:
            return mask.float().flatten(1).mean(1)

        h_rich = h > T_H
        tissue_frac = frac(tissue)
        comp = [
            frac(odsum < T_BACKGROUND),
            frac(odsum < T_PALE),
            frac(odsum > T_DARK),
            frac(h_rich),
            frac(h > T_H_HIGH),
            frac((e > T_E) & ~h_rich),
            frac(h_rich & (tissue > 0)) / (tissue_frac + _EPS),
        ]
        comp_names = ["background", "pale", "dark", "h_rich", "h_dense", "e_rich", "h_rich_of_tissue"]
        out.append(([f"composition/{c}_frac" for c in comp_names], torch.stack(comp, dim=1)))

        # --- texture
        he = torch.cat([h, e], dim=1)  # (B, 2, h, w)
        grads, names = [], []
        level = he
        for scale in (1, 2, 4):
            if scale > 1:
                level = F.avg_pool2d(level, 2)
            gx, gy = _sobel(level)
            mag = (gx.square() + gy.square() + 1e-12).sqrt()
            g_mean, g_std = _mean_std(mag)
            grads += [g_mean, g_std]
            names += [f"texture/grad{scale}_{c}_{s}" for s in ("mean", "std") for c in "he"]
        out.append((names, torch.cat(grads, dim=1)))

        diffs = []
        for d in (1, 2, 4, 8):
            dx = (he[..., :, d:] - he[..., :, :-d]).abs().flatten(2).mean(2)
            dy = (he[..., d:, :] - he[..., :-d, :]).abs().flatten(2).mean(2)
            diffs.append(0.5 * (dx + dy))
        out.append(([f"texture/diff{d}_{c}" for d in (1, 2, 4, 8) for c in "he"], torch.cat(diffs, dim=1)))

        local = []
        for k in (5, 9):
            box = getattr(self, f"box{k}")
            var = _filter(he.square(), box) - _filter(he, box).square()
            local.append(var.clamp(min=0.0).sqrt().flatten(2).mean(2))
        out.append(([f"texture/localstd{k}_{c}" for k in (5, 9) for c in "he"], torch.cat(local, dim=1)))

        gx, gy = _sobel(he)
        g2 = getattr(self, _gname(WORK_PX, 2.0))
        jxx, jyy, jxy = _filter(gx.square(), g2), _filter(gy.square(), g2), _filter(gx * gy, g2)
        aniso = ((jxx - jyy).square() + 4.0 * jxy.square() + 1e-12).sqrt().flatten(2).sum(2)
        energy = (jxx + jyy).flatten(2).sum(2)
        out.append((["texture/coherence_h", "texture/coherence_e"], aniso / (energy + 1e-6)))

        # --- blobs: DoG (sigma, 1.6 sigma) of H, sigma 1.5 px on the 1, 2 and 4 µm/px grids
        blobs, names = [], []
        level = h
        hs = h
        for scale in (1, 2, 4):
            if scale > 1:
                level = F.avg_pool2d(level, 2)
            n = level.shape[-1]
            lo = _filter(level, getattr(self, _gname(n, 1.5)))
            if scale == 1:
                hs = lo
            dog = (lo - _filter(level, getattr(self, _gname(n, 2.4)))).flatten(1)
            d_mean = dog.mean(1)
            blobs += [dog.clamp(min=0.0).mean(1), (dog.square().mean(1) - d_mean.square()).clamp(min=0.0).sqrt()]
            names += [f"blobs/dog{1.5 * scale:g}_pos_mean", f"blobs/dog{1.5 * scale:g}_std"]
        out.append((names, torch.stack(blobs, dim=1)))

        # --- nuclei: prominent local maxima of H smoothed at 1.5 µm
        area = float(WORK_PX * WORK_PX)
        peaks = {}
        for k in (7, 11):
            is_max = (hs >= _max_filter(hs, k)) & (hs - _filter(hs, getattr(self, f"box{k}")) > 0.02)
            peaks[k] = is_max
        p7 = (peaks[7] & (hs > T_H)).float()
        nuc = [
            p7.flatten(1).sum(1),
            (peaks[7] & (hs > T_H_HIGH)).float().flatten(1).sum(1),
            (peaks[11] & (hs > T_H)).float().flatten(1).sum(1),
        ]
        nuc = [c / area * 1e4 for c in nuc] + [_masked_mean(hs, p7)]
        names = [
            "nuclei/peaks7_h035_per_1e4um2",
            "nuclei/peaks7_h07_per_1e4um2",
            "nuclei/peaks11_h035_per_1e4um2",
            "nuclei/peak_h_mean",
        ]
        out.append((names, torch.stack(nuc, dim=1)))

        # --- heterogeneity (4 x 4 cells)
        cells = F.adaptive_avg_pool2d(torch.cat([h, e, tissue], dim=1), 4).flatten(2)  # (B, 3, 16)
        c_mean = cells.mean(2)
        c_std = (cells.square().mean(2) - c_mean.square()).clamp(min=0.0).sqrt()
        het = torch.cat([c_std, cells.amin(2), cells.amax(2)], dim=1)
        out.append(([f"heterogeneity/cell_{c}_{s}" for s in ("std", "min", "max") for c in ("h", "e", "tissue")], het))
        return out


@cache
def feature_names() -> tuple[str, ...]:
    """Names of the ``stain-texture`` features, in output order (``group/name``).

    Returns
    -------
    Tuple of :data:`EMBED_DIM` names.
    """
    groups = StainTexture().named_features(torch.zeros(1, 3, WORK_PX, WORK_PX))
    return tuple(name for names, _ in groups for name in names)
