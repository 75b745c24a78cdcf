"""Lazy pyramid levels and the recorded pixel size of TIFF-family slide files (TIFF, BigTIFF, OME-TIFF, SVS, NDPI).

Read with ``tifffile``: each pyramid level becomes a dask array over tifffile's zarr store, whose chunks are
the file's own tiles (or strips), so a computation decodes only the tiles it touches. The pixel size comes from
the file's metadata, in this order: OME-XML ``PhysicalSizeX`` / ``PhysicalSizeY`` (with their units), the Aperio
``MPP = ...`` field of an SVS ``ImageDescription``, then the TIFF ``XResolution`` / ``YResolution`` tags with their
``ResolutionUnit`` (inch, cm; tifffile's non-standard mm and µm too). Checked against tifffile 2026.3.3.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger(__name__)

PLAUSIBLE_UM_PER_PX = (0.02, 50.0)
"""Pixel sizes outside this range (µm/px) are not microscope scans (e.g. 72 dpi defaults) and count as absent."""

# µm per unit of the OME-XML ``UnitsLength`` symbols and of the TIFF ``ResolutionUnit`` codes.
OME_UNITS_UM = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4}
OME_UNITS_UM["\u03bcm"] = 1.0  # Greek mu, as some writers spell it
TIFF_UNITS_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}
TIFF_UNIT_NAMES = {1: "none", 2: "inch", 3: "cm", 4: "mm", 5: "µm"}
_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


@dataclass(frozen=True)
class PixelSize:
    """The pixel size a slide file records for its full-resolution level.

    Attributes
    ----------
    um_per_px
        ``(x, y)`` µm/px, or ``None`` when the file records none (or an implausible one).
    source
        Where it was read (e.g. ``"OME PhysicalSizeX"``), or why there is none.
    """

    um_per_px: tuple[float, float] | None
    source: str


def _plausible(x: float, y: float) -> bool:
    lo, hi = PLAUSIBLE_UM_PER_PX
    return all(math.isfinite(v) and lo <= v <= hi for v in (x, y))


def _ome_pixel_size(xml: str) -> PixelSize | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        if pixels.get(f"PhysicalSize{axis}") is None:  # no PhysicalSizeY: square pixels of PhysicalSizeX
            axis = "X"
        value = pixels.get(f"PhysicalSize{axis}")
        assert value is not None  # PhysicalSizeX is present (checked above)
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in OME_UNITS_UM:
            return PixelSize(None, f"OME PhysicalSize{axis}Unit {unit!r} is not a length unit this reader knows")
        sizes.append(float(value) * OME_UNITS_UM[unit])
    if not _plausible(*sizes):
        return PixelSize(None, f"OME PhysicalSizeX/Y = {sizes[0]:g} / {sizes[1]:g} µm, not a plausible scan")
    return PixelSize((sizes[0], sizes[1]), "OME PhysicalSizeX/Y")


def _aperio_pixel_size(description: str) -> PixelSize | None:
    if not description.startswith("Aperio"):
        return None
    match = _MPP.search(description)
    if match is None:
        return None
    mpp = float(match.group(1))
    if not _plausible(mpp, mpp):
        return PixelSize(None, f"Aperio MPP = {mpp:g}, not a plausible scan")
    return PixelSize((mpp, mpp), "Aperio MPP in the ImageDescription")


def _tag_pixel_size(page: Any) -> PixelSize:
    tags = page.tags
    if "XResolution" not in tags:
        return PixelSize(None, "no OME PhysicalSizeX, no Aperio MPP and no XResolution tag")
    unit = int(tags.valueof(296, default=2))
    if unit not in TIFF_UNITS_UM:
        return PixelSize(None, f"XResolution has ResolutionUnit {TIFF_UNIT_NAMES.get(unit, unit)!r} (no length unit)")
    per_unit = []
    for name in ("XResolution", "YResolution"):
        value = tags.valueof(name, default=tags.valueof("XResolution"))
        num, den = value if isinstance(value, tuple) else (value, 1)
        per_unit.append(float(num) / float(den) if den else float("nan"))
    if not all(v > 0 for v in per_unit):
        return PixelSize(None, f"XResolution/YResolution = {per_unit} px per {TIFF_UNIT_NAMES[unit]}")
    sizes = [TIFF_UNITS_UM[unit] / v for v in per_unit]
    if not _plausible(*sizes):
        return PixelSize(
            None,
            f"XResolution = {per_unit[0]:g} px per {TIFF_UNIT_NAMES[unit]} ({sizes[0]:g} µm/px), "
            "a placeholder rather than a scan resolution",
        )
    return PixelSize((sizes[0], sizes[1]), f"TIFF XResolution/YResolution (px per {TIFF_UNIT_NAMES[unit]})")


def tiff_pixel_size(path: str | PathLike, *, series: int = 0) -> PixelSize:
    """The pixel size (µm/px) that a TIFF-family file records for the full-resolution level of a series.

    Parameters
    ----------
    path
        TIFF, BigTIFF, OME-TIFF, SVS or NDPI file.
    series
        Image series (0: the main image; SVS thumbnails, labels and macros are later series).

    Returns
    -------
    A :class:`PixelSize`; its ``um_per_px`` is ``None`` when the file records no plausible pixel size.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            found = _ome_pixel_size(tif.ome_metadata)
            if found is not None:
                return found
        page = tif.series[series].pages[0] if tif.series[series].pages else tif.pages[0]
        page = page.keyframe if page is not None and hasattr(page, "keyframe") else page
        found = _aperio_pixel_size(str(tif.pages.first.description or ""))
        if found is not None:
            return found
        return _tag_pixel_size(page)


def _channels_last(arr: da.Array, axes: str, path: Path) -> da.Array:
    """Bring a level with tifffile axes (e.g. ``"YXS"``, ``"ZYXS"``, ``"CYX"``) to ``(c, y, x)``."""
    keep = []
    for i, ax in enumerate(axes):
        if ax in "YXSC":
            keep.append(ax)
        elif arr.shape[i] != 1:
            raise ValueError(
                f"{path}: axis {ax!r} of size {arr.shape[i]} (axes {axes!r}); only 2D RGB slides are read."
            )
    index = tuple(slice(None) if ax in "YXSC" else 0 for ax in axes)
    arr = arr[index]
    if "S" in keep and "C" in keep:  # e.g. OME "CYXS" with one channel
        c = keep.index("C")
        if arr.shape[c] != 1:
            raise ValueError(f"{path}: both channel (C) and sample (S) axes hold data (axes {axes!r}).")
        arr = arr[tuple(0 if i == c else slice(None) for i in range(arr.ndim))]
        keep.remove("C")
    chan = "S" if "S" in keep else "C"
    if chan not in keep:
        raise ValueError(f"{path} is a single-channel image (axes {axes!r}); an H&E slide needs RGB channels.")
    return arr.transpose([keep.index(chan), keep.index("Y"), keep.index("X")])


class TiffLevel:
    """Array-like view of one pyramid level of a TIFF series, read through tifffile's zarr store.

    It opens its own file handle in each process (after a fork, or when unpickled in a worker), so that
    dask graphs over it can be sent to data-loader workers and processes never share a file offset. Within
    a process, tifffile's file lock serialises the reads of the threads.
    """

    def __init__(self, path: Path, series: int, level: int) -> None:
        self.path, self.series, self.level = Path(path), int(series), int(level)
        self._lock = threading.Lock()
        self._array: Any = None  # the zarr array, opened per process
        self._pid = -1
        arr = self._open()
        self.shape, self.dtype, self.chunks = tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks)
        self.ndim = len(self.shape)

    def _open(self) -> Any:
        if self._array is None or self._pid != os.getpid():
            import tifffile
            import zarr

            with self._lock:
                store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
                self._array, self._pid = zarr.open(store, mode="r"), os.getpid()
        return self._array

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._open()[key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_array=None, _pid=-1, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __dask_tokenize__(self) -> tuple:
        stat = self.path.stat()
        return (
            "genedml_sd.TiffLevel",
            str(self.path.resolve()),
            stat.st_mtime_ns,
            stat.st_size,
            self.series,
            self.level,
        )


def tiff_levels(path: str | PathLike, *, series: int = 0) -> list[da.Array]:
    """The pyramid levels of a TIFF-family file as lazy ``(c, y, x)`` dask arrays, finest first.

    Chunks are the file's tiles (or strips); nothing is decoded until a window is computed, and then only the
    tiles under it. An RGBA slide keeps its first three channels. The arrays can be pickled (each process
    reopens the file, see :class:`TiffLevel`).

    Parameters
    ----------
    path
        The slide file.
    series
        Image series to read (default 0, the main image).

    Raises
    ------
    ValueError
        If the series does not exist or is not a 2D RGB image; the message names the file.
    """
    import dask.array as da
    import tifffile

    path = Path(path)
    with tifffile.TiffFile(path) as tif:
        if series >= len(tif.series):
            raise ValueError(f"{path} has {len(tif.series)} image series; series={series} does not exist.")
        main = tif.series[series]
        axes = [lv.axes for lv in main.levels]
        shapes = [lv.shape for lv in main.levels]
    levels = []
    for k, (ax, shape) in enumerate(zip(axes, shapes, strict=True)):
        source = TiffLevel(path, series, k)
        if source.shape != tuple(shape):
            raise ValueError(f"{path}: level {k} of shape {source.shape} does not match the series level {shape}.")
        arr = da.from_array(
            source, chunks=source.chunks, asarray=True, lock=False, meta=np.empty((0,) * source.ndim, source.dtype)
        )
        level = _channels_last(arr, ax, path)
        if level.shape[0] not in (3, 4):
            raise ValueError(f"{path} has {level.shape[0]} channels (axes {ax!r}); an H&E slide needs RGB.")
        levels.append(level[:3])
    chunk = levels[0].chunksize
    if chunk[1] * chunk[2] > 4096 * 4096:
        logger.warning(
            "%s is not tiled (chunks of %d x %d px): every window read decodes a whole chunk; convert it to a "
            "tiled pyramidal TIFF for fast tiling.",
            path,
            chunk[2],
            chunk[1],
        )
    return levels


def is_tiff(path: str | PathLike) -> bool:
    """Whether ``path`` is a file tifffile can read (by its header, not its name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def image_levels_from_file(path: str | PathLike, *, series: int = 0) -> tuple[list[da.Array], PixelSize]:
    """Lazy levels and recorded pixel size of any image file: TIFF family via tifffile, else PIL (in memory).

    PNG and JPEG files have no tiles, so they are decoded once into memory (chunked by 1024 px).
    """
    import dask.array as da

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {path} does not exist.")
    if is_tiff(path):
        return tiff_levels(path, series=series), tiff_pixel_size(path, series=series)
    from ._legacy_st import read_rgb

    logger.info("%s is not a TIFF: decoding it into memory (%s)", path, path.suffix)
    rgb = read_rgb(path)
    arr = da.from_array(np.ascontiguousarray(rgb.transpose(2, 0, 1)), chunks=(3, 1024, 1024))
    return [arr], PixelSize(None, f"{path.suffix or 'this'} file records no pixel size (it is not a TIFF)")
