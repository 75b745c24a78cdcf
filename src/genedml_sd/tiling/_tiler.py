"""Multi-scale tiles around spots, read lazily from an image pyramid.

A :class:`SpotTiler` maps spot centres through the coordinate transformations into the pixel frame
of the pyramid level whose resolution is closest to (and not coarser than) the target µm/px,
reads one small window per spot from the dask-backed level (never the whole image), and resamples
all windows of a batch at once with bilinear interpolation (plus a Gaussian anti-alias pre-filter
when shrinking). Borders are padded with white.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genedml_sd._spatial import (
    check_circles,
    get_pixel_size,
    image_levels,
    level_downsampling,
    resolve_key,
    spots_to_pixels,
)

from ._geometry import TileGeometry

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

PAD_VALUE = 255
"""Fill value for pixels outside the image (white, like glass)."""

COARSE_WARNING_RATIO = 4.0
"""Warn when the requested µm/px is finer than the image's own by more than this factor."""


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level read for a given target resolution."""

    level: int
    um_per_px: tuple[float, float]
    """µm/px of the level along ``(y, x)``."""


def choose_level(levels_um_per_px: np.ndarray, target_um_per_px: float) -> int:
    """Index of the coarsest level whose µm/px is not coarser than the target (or 0 if all are).

    Parameters
    ----------
    levels_um_per_px
        µm/px of each level, shape (n_levels,) or (n_levels, 2) for ``(y, x)``.
    target_um_per_px
        Wanted resolution.
    """
    per_level = np.asarray(levels_um_per_px, dtype=np.float64).reshape(len(levels_um_per_px), -1).max(axis=1)
    ok = np.flatnonzero(per_level <= target_um_per_px * (1 + 1e-6))
    return int(ok.max()) if ok.size else 0


class SpotTiler:
    """Cut tiles (local) and tile grids (neighbour region) around the spots of a SpatialData object.

    Parameters
    ----------
    sdata
        The SpatialData object; it is not modified.
    image_key
        Image element (single-scale or multiscale). Its pixel size must be recorded, see
        :func:`genedml_sd.io.set_pixel_size`.
    shapes_key
        Circles element with the spots.
    geometry
        Tile sizes (µm, px); defaults to the paper's 112 µm / 224 px tiles and a 5x5 neighbour grid.
    """

    def __init__(
        self,
        sdata: SpatialData,
        image_key: str | None = None,
        shapes_key: str | None = None,
        geometry: TileGeometry | None = None,
    ) -> None:
        self.image_key = resolve_key(sdata, "images", image_key)
        self.shapes_key = resolve_key(sdata, "shapes", shapes_key)
        self.geometry = geometry or TileGeometry()
        check_circles(sdata[self.shapes_key], self.shapes_key)

        image = sdata[self.image_key]
        self.levels: list[xr.DataArray] = image_levels(image)
        channels = self.levels[0].sizes.get("c", 0)
        if channels != 3:
            raise ValueError(f"Image {self.image_key!r} must have 3 (RGB) channels, found {channels}.")
        self.um_per_px0 = get_pixel_size(sdata, self.image_key)
        self.levels_um_per_px = self.um_per_px0 * level_downsampling(self.levels)  # (n_levels, 2) as (y, x)

        xy0 = spots_to_pixels(sdata, self.shapes_key, self.image_key, level=0)
        h0, w0 = self.levels[0].sizes["y"], self.levels[0].sizes["x"]
        off = ~((xy0[:, 0] >= 0) & (xy0[:, 0] <= w0) & (xy0[:, 1] >= 0) & (xy0[:, 1] <= h0))
        if off.any():
            ids = list(sdata[self.shapes_key].index[off][:5])
            raise ValueError(
                f"{int(off.sum())} spots of {self.shapes_key!r} lie outside image {self.image_key!r} "
                f"({w0} x {h0} px), e.g. ids {ids}; check the elements' coordinate transformations."
            )
        self._xy0 = xy0
        self.spot_ids = sdata[self.shapes_key].index.to_numpy()
        self.n_spots = len(xy0)

        target = self.geometry.um_per_px
        own = float(self.levels_um_per_px[0].max())
        if own > COARSE_WARNING_RATIO * target:
            warnings.warn(
                f"Tiles of {target:g} µm/px requested from image {self.image_key!r}, whose finest level is "
                f"{own:.3g} µm/px: tiles will be upsampled {own / target:.1f}x and carry less detail.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------------ geometry
    def level_for(self, um_per_px: float) -> LevelChoice:
        """The pyramid level read for tiles at ``um_per_px``."""
        k = choose_level(self.levels_um_per_px, um_per_px)
        y, x = self.levels_um_per_px[k]
        return LevelChoice(level=k, um_per_px=(float(y), float(x)))

    def centres_px(self, level: int = 0) -> np.ndarray:
        """Spot centres in continuous pixel coordinates of ``level``, shape (n_spots, 2) as ``(x, y)``."""
        ds = level_downsampling(self.levels)[level]  # (sy, sx)
        return self._xy0 / np.array([ds[1], ds[0]])

    # ------------------------------------------------------------------------------------------ reading
    def local_tiles(self, indices: Sequence[int] | np.ndarray, *, scheduler: str | None = None) -> np.ndarray:
        """Local tiles of the given spots, ``uint8`` array (B, 3, tile_px, tile_px)."""
        g = self.geometry
        return self.read_regions(indices, g.tile_um, g.tile_px, scheduler=scheduler)

    def neighbour_tiles(self, indices: Sequence[int] | np.ndarray, *, scheduler: str | None = None) -> np.ndarray:
        """Neighbour grids of the given spots, ``uint8`` array (B, grid**2, 3, tile_px, tile_px).

        Tile ``t = row * grid + col`` covers row ``row`` (top to bottom) and column ``col`` (left to
        right) of the ``region_um``-wide square centred on the spot; the centre tile equals the local
        tile.
        """
        g = self.geometry
        region = self.read_regions(indices, g.region_um, g.region_px, scheduler=scheduler)
        b = region.shape[0]
        grid = region.reshape(b, 3, g.grid, g.tile_px, g.grid, g.tile_px)
        return np.ascontiguousarray(
            grid.transpose(0, 2, 4, 1, 3, 5).reshape(b, g.n_neighbours, 3, g.tile_px, g.tile_px)
        )

    def read_regions(
        self,
        indices: Sequence[int] | np.ndarray,
        side_um: float,
        out_px: int,
        *,
        scheduler: str | None = None,
    ) -> np.ndarray:
        """Square regions of ``side_um`` µm centred on spots, resampled to ``out_px`` px.

        Parameters
        ----------
        indices
            Spot positions (0-based, in shapes order), length B.
        side_um
            Side of the square region in µm.
        out_px
            Side of the output in px; output resolution is ``side_um / out_px`` µm/px.
        scheduler
            Dask scheduler for reading the windows (use ``"synchronous"`` inside worker processes).

        Returns
        -------
        ``uint8`` array (B, 3, out_px, out_px).
        """
        import dask

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_spots):
            raise IndexError(f"Spot indices must lie in [0, {self.n_spots}), got {idx.min()}..{idx.max()}.")
        choice = self.level_for(side_um / out_px)
        level = self.levels[choice.level]
        data = level.data
        h, w = level.sizes["y"], level.sizes["x"]
        # source px per output px along (x, y)
        step = np.array([side_um / out_px / choice.um_per_px[1], side_um / out_px / choice.um_per_px[0]])
        sigma = _antialias_sigma(step)
        margin = int(math.ceil(3 * sigma.max())) + 1 if sigma.max() > 0 else 1
        centres = self.centres_px(choice.level)[idx]
        first = centres - out_px * step / 2 + 0.5 * step - 0.5  # sample index of the first output pixel (x, y)
        last = first + (out_px - 1) * step
        lo = np.floor(first).astype(np.int64) - margin
        hi = np.floor(last).astype(np.int64) + 1 + margin + 1  # exclusive
        win = hi - lo  # (B, 2) window sizes (x, y)

        lazy = []
        for (x0, y0), (x1, y1) in zip(lo, hi, strict=True):
            lazy.append(data[:, max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)])
        windows = dask.compute(*lazy, scheduler=scheduler) if lazy else []

        wmax, hmax = win.max(axis=0) if len(win) else (1, 1)
        batch = np.full((len(idx), 3, hmax, wmax), PAD_VALUE, dtype=np.uint8)
        for i, arr in enumerate(windows):
            x0, y0 = lo[i]
            ox, oy = max(-x0, 0), max(-y0, 0)
            batch[i, :, oy : oy + arr.shape[1], ox : ox + arr.shape[2]] = arr
        return _resample(batch, first - lo, step, out_px, sigma)

    def iter_batches(
        self, kind: str, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, tiles)`` batches of ``kind`` ``"local"`` or ``"neighbour"`` tiles in spot order."""
        order = np.arange(self.n_spots) if indices is None else np.asarray(indices)
        read = {"local": self.local_tiles, "neighbour": self.neighbour_tiles}[kind]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, read(chunk)


def _antialias_sigma(step: np.ndarray) -> np.ndarray:
    """Gaussian pre-filter sigma (source px) per axis for a shrink by ``step`` (0 when enlarging)."""
    return np.where(step > 1.0 + 1e-6, np.sqrt(np.maximum(step**2 - 1.0, 0.0)) / 2.0, 0.0)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(int(math.ceil(3 * sigma)), 1)
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _resample(batch: np.ndarray, first: np.ndarray, step: np.ndarray, out_px: int, sigma: np.ndarray) -> np.ndarray:
    """Bilinear resampling of windows to ``out_px`` squares, vectorised over the batch.

    Parameters
    ----------
    batch
        ``uint8`` windows (B, 3, H, W), each with its own region starting at index ``first``.
    first
        Sample index ``(x, y)`` of the first output pixel inside each window, shape (B, 2).
    step
        Source px per output px, ``(x, y)``.
    out_px
        Output side in px.
    sigma
        Anti-alias Gaussian sigma per axis ``(x, y)`` in source px (0 = none).
    """
    import torch
    import torch.nn.functional as F

    b, c, h, w = batch.shape
    if b == 0:
        return np.zeros((0, c, out_px, out_px), dtype=np.uint8)
    x = torch.from_numpy(batch).float()
    for axis, s in ((3, sigma[0]), (2, sigma[1])):  # separable blur along x then y
        if s > 0:
            k = torch.from_numpy(_gaussian_kernel(float(s)))
            shape = (1, 1, 1, -1) if axis == 3 else (1, 1, -1, 1)
            weight = k.reshape(shape).repeat(c, 1, 1, 1)
            pad = (len(k) // 2, len(k) // 2, 0, 0) if axis == 3 else (0, 0, len(k) // 2, len(k) // 2)
            x = F.conv2d(F.pad(x, pad, mode="replicate"), weight, groups=c)
    j = torch.arange(out_px, dtype=torch.float64)
    first_t = torch.from_numpy(first)
    sx = first_t[:, 0:1] + j[None, :] * float(step[0])  # (B, out) sample index along x
    sy = first_t[:, 1:2] + j[None, :] * float(step[1])
    gx = (2 * sx / max(w - 1, 1) - 1).float()
    gy = (2 * sy / max(h - 1, 1) - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, out, out, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()
