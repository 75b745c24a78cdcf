"""Windowed, µm-aware reads from one image pyramid: level choice, pixel-value scaling, anti-aliased resampling.

A :class:`SlideReader` knows the pyramid levels of an image element and the µm/px of each. To read a
square of ``side_um`` µm around a point at ``out_px`` px it picks the coarsest level that is not
coarser than the output resolution (:func:`choose_level`), computes one small window per point from
the dask-backed level (never the whole image), brings the pixel values to ``uint8`` (see
``to_uint8``) and resamples all windows of a batch at once with bilinear interpolation (plus a
Gaussian anti-alias pre-filter when shrinking). Borders are padded with white.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``; points are given
as ``(x, y)`` in level-0 (full-resolution) pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genedml_sd._spatial import get_pixel_size, image_levels, level_downsampling, resolve_key

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

PAD_VALUE = 255
"""Fill value for pixels outside the image (white, like glass)."""

FLOAT_TOLERANCE = 1.0 / 255.0
"""Float images must hold values in ``[0, 1]``; values up to one grey level outside are clipped, others rejected."""


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


def to_uint8(window: np.ndarray, *, image_key: str = "image", where: str = "") -> np.ndarray:
    """Pixel values of an image window as ``uint8``, scaled from the image's dtype.

    ``uint8`` is returned as is; ``uint16`` is scaled by ``255 / 65535``; floats must hold values
    in ``[0, 1]`` (as many pipelines store H&E) and are scaled by 255; other integer types must
    hold values in ``[0, 255]``. Scaled values are rounded to the nearest integer.

    Parameters
    ----------
    window
        Pixels of any shape.
    image_key
        Image element, for the error message.
    where
        Where the window was read (level, pixel ranges), for the error message.

    Returns
    -------
    ``uint8`` array of the same shape.

    Raises
    ------
    ValueError
        Values outside the range of the dtype (e.g. a float image holding 0..255), non-finite
        values, or a dtype that is not an integer or a float. The message names the image, the
        dtype and the minimum and maximum found in the window.
    """
    arr = np.asarray(window)
    dtype = arr.dtype
    if dtype == np.uint8:
        return arr
    if dtype == np.uint16:
        return np.rint(arr.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(
                f"Image {image_key!r} ({dtype}) has non-finite values (NaN or inf) in the window read{where}; "
                "tiles need finite RGB values in [0, 1] (float) or 0..255 (uint8)."
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            hint = " Divide it by 255 or convert it to uint8." if 0 <= lo and hi <= 255.0 else ""
            raise ValueError(
                f"Image {image_key!r} is {dtype} with values in [{lo:g}, {hi:g}] in the window read{where}; "
                f"float images must hold values in [0, 1].{hint}"
            )
        return np.clip(np.rint(arr * np.float32(255.0)), 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"Image {image_key!r} is {dtype} with values in [{lo}, {hi}] in the window read{where}; "
                "integer images other than uint16 must hold 8-bit values 0..255 (store 16-bit data as uint16)."
            )
        return arr.astype(np.uint8)
    raise ValueError(f"Image {image_key!r} has pixel type {dtype}; tiles need uint8, uint16 or float RGB values.")


class SlideReader:
    """Read square regions of one image pyramid at a physical size and resolution.

    Parameters
    ----------
    image
        The image element: a ``(c, y, x)`` DataArray or a multiscale DataTree (levels finest first),
        with 3 (RGB) channels, ``uint8``, ``uint16`` or float in ``[0, 1]``.
    um_per_px0
        Pixel size of the finest level (``scale0``), µm/px.
    image_key
        Name of the image, for messages.

    Attributes
    ----------
    levels
        The pyramid levels, finest first.
    downsampling
        Factor ``(sy, sx)`` of each level relative to level 0, (n_levels, 2).
    levels_um_per_px
        µm/px of each level along ``(y, x)``, (n_levels, 2).
    """

    def __init__(self, image: xr.DataArray | xr.DataTree, um_per_px0: float, *, image_key: str = "image") -> None:
        self.image_key = image_key
        self.levels: list[xr.DataArray] = _rgb_levels(image, image_key)
        self.um_per_px0 = um_per_px0
        self.downsampling = level_downsampling(self.levels)
        self.levels_um_per_px = self.um_per_px0 * self.downsampling  # (n_levels, 2) as (y, x)

    @classmethod
    def from_sdata(cls, sdata: SpatialData, image_key: str | None = None) -> SlideReader:
        """The reader of an image element of ``sdata``, with its recorded pixel size.

        Parameters
        ----------
        sdata
            The SpatialData object (not modified).
        image_key
            Image element; inferred when there is only one.
        """
        key = resolve_key(sdata, "images", image_key)
        _rgb_levels(sdata[key], key)  # the channels are checked before the pixel size
        return cls(sdata[key], get_pixel_size(sdata, key), image_key=key)

    @property
    def shape_px0(self) -> tuple[int, int]:
        """``(height, width)`` of level 0 in px."""
        return int(self.levels[0].sizes["y"]), int(self.levels[0].sizes["x"])

    def level_for(self, um_per_px: float) -> LevelChoice:
        """The pyramid level read for output pixels of ``um_per_px`` µm."""
        k = choose_level(self.levels_um_per_px, um_per_px)
        y, x = self.levels_um_per_px[k]
        return LevelChoice(level=k, um_per_px=(float(y), float(x)))

    def to_level(self, xy0: np.ndarray, level: int) -> np.ndarray:
        """Level-0 continuous pixel coordinates ``(x, y)`` (n, 2) in the pixel frame of ``level``."""
        ds = self.downsampling[level]  # (sy, sx)
        return xy0 / np.array([ds[1], ds[0]])

    def overview(self, max_px: int = 2000) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole image at most ``max_px`` px on its long side, for plots (e.g. squidpy's ``hires``).

        Reads the finest pyramid level that fits in ``max_px``; when even the coarsest level is
        larger, it is block-averaged lazily (dask, chunk by chunk) by the smallest integer factor
        that fits. The full-resolution level is never decoded at once.

        Parameters
        ----------
        max_px
            Longest side of the result, px.

        Returns
        -------
        ``(rgb, um_per_px)``: ``uint8`` array (height, width, 3) and its pixel size ``(y, x)`` in µm.
        Pixel ``(i, j)`` covers level-0 pixels ``[i * s, (i + 1) * s)`` with ``s = um_per_px / um_per_px0``.
        """
        if int(max_px) < 1:
            raise ValueError(f"max_px must be a positive number of pixels, got {max_px!r}.")
        sizes = [max(lv.sizes["y"], lv.sizes["x"]) for lv in self.levels]
        fits = [k for k, n in enumerate(sizes) if n <= max_px]
        k = min(fits) if fits else len(self.levels) - 1
        level = self.levels[k].transpose("c", "y", "x")
        factor = max(1, math.ceil(sizes[k] / max_px))
        if factor > 1:
            level = level.coarsen(x=factor, y=factor, boundary="trim").mean()
        arr = np.asarray(level.data.compute() if hasattr(level.data, "compute") else level.values)
        if factor > 1 and np.issubdtype(self.levels[k].dtype, np.integer):  # block means back to the dtype
            arr = np.rint(arr).astype(self.levels[k].dtype)
        rgb = to_uint8(arr, image_key=self.image_key, where=f" (overview of level {k})")
        um = self.levels_um_per_px[k] * factor
        return np.ascontiguousarray(np.moveaxis(rgb, 0, -1)), (float(um[0]), float(um[1]))

    def read_regions(
        self, centres_px0: np.ndarray, side_um: float, out_px: int, *, scheduler: str | None = None
    ) -> np.ndarray:
        """Square regions of ``side_um`` µm centred on points, resampled to ``out_px`` px.

        Parameters
        ----------
        centres_px0
            Region centres ``(x, y)`` in level-0 continuous pixel coordinates, (B, 2).
        side_um
            Side of the square region in µm.
        out_px
            Side of the output in px; output resolution is ``side_um / out_px`` µm/px.
        scheduler
            Dask scheduler for reading the windows (use ``"synchronous"`` inside worker processes).

        Returns
        -------
        ``uint8`` array (B, 3, out_px, out_px).

        Raises
        ------
        ValueError
            If the pixel values read are outside the range of the image's dtype (see ``to_uint8``).
        """
        import dask

        xy0 = np.asarray(centres_px0, dtype=np.float64).reshape(-1, 2)
        choice = self.level_for(side_um / out_px)
        level = self.levels[choice.level]
        data = level.data
        h, w = level.sizes["y"], level.sizes["x"]
        # source px per output px along (x, y)
        step = np.array([side_um / out_px / choice.um_per_px[1], side_um / out_px / choice.um_per_px[0]])
        sigma = _antialias_sigma(step)
        margin = int(math.ceil(3 * sigma.max())) + 1 if sigma.max() > 0 else 1
        centres = self.to_level(xy0, choice.level)
        first = centres - out_px * step / 2 + 0.5 * step - 0.5  # sample index of the first output pixel (x, y)
        last = first + (out_px - 1) * step
        lo = np.floor(first).astype(np.int64) - margin
        hi = np.floor(last).astype(np.int64) + 1 + margin + 1  # exclusive
        win = hi - lo  # (B, 2) window sizes (x, y)

        # clipped to the image; a window wholly outside it reads nothing (never a negative, wrap-around slice)
        bounds = []
        for (x0, y0), (x1, y1) in zip(lo, hi, strict=True):
            ya, xa = min(max(y0, 0), h), min(max(x0, 0), w)
            bounds.append((ya, max(min(y1, h), ya), xa, max(min(x1, w), xa)))
        lazy = [data[:, ya:yb, xa:xb] for ya, yb, xa, xb in bounds]
        windows = dask.compute(*lazy, scheduler=scheduler) if lazy else []

        wmax, hmax = win.max(axis=0) if len(win) else (1, 1)
        batch = np.full((len(xy0), 3, hmax, wmax), PAD_VALUE, dtype=np.uint8)
        for i, arr in enumerate(windows):
            x0, y0 = lo[i]
            ox, oy = max(-x0, 0), max(-y0, 0)
            if arr.dtype != np.uint8:
                ya, yb, xa, xb = bounds[i]
                where = f" (level {choice.level}, rows {ya}:{yb}, columns {xa}:{xb})"
                arr = to_uint8(arr, image_key=self.image_key, where=where)
            if arr.size:
                batch[i, :, oy : oy + arr.shape[1], ox : ox + arr.shape[2]] = arr
        return _resample(batch, first - lo, step, out_px, sigma)


def _rgb_levels(image: xr.DataArray | xr.DataTree, image_key: str) -> list[xr.DataArray]:
    levels = image_levels(image)
    channels = levels[0].sizes.get("c", 0)
    if channels != 3:
        raise ValueError(f"Image {image_key!r} must have 3 (RGB) channels, found {channels}.")
    return levels


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
