"""H&E-only whole-slide images (SVS, NDPI, OME-TIFF, pyramidal TIFF) read lazily into SpatialData."""

from __future__ import annotations

import logging
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from genedml_sd._spatial import set_pixel_size

from ._build import MIN_LEVEL_SIDE
from ._pyramid import extend_levels, multiscale_image
from ._tiff import PixelSize, image_levels_from_file

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

PIXEL_SIZE_TOLERANCE = 0.05
"""Relative disagreement between a passed and a recorded pixel size above which a warning is given."""

_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", ".ndpi", ".btf", ".scn", ".qptiff")


def element_name(path: str | PathLike, suffix: str = "") -> str:
    """A valid SpatialData element name from a file name (``slide-1.ome.tif`` -> ``slide-1`` + suffix)."""
    name = Path(path).name
    for ext in _SLIDE_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        name = Path(name).stem
    name = re.sub(r"[^0-9A-Za-z_.-]", "_", name).strip(".") or "slide"
    return f"{name}{suffix}"


def resolve_pixel_size(
    recorded: PixelSize, um_per_px: float | None, path: str | PathLike, *, what: str = "the slide"
) -> float:
    """µm/px to use: the passed value (warning when it differs from the file by > 5 %) or the file's own.

    Raises
    ------
    ValueError
        If the file records no pixel size and none is passed; the message names the file and why.
    """
    if recorded.um_per_px is not None:
        x, y = recorded.um_per_px
        file_value = (x + y) / 2
        if abs(x - y) > 0.01 * file_value:
            warnings.warn(
                f"{path} records different pixel sizes along x and y ({x:g} and {y:g} µm/px, {recorded.source}); "
                f"using their mean {file_value:g} µm/px.",
                UserWarning,
                stacklevel=3,
            )
    else:
        file_value = None
    if um_per_px is None:
        if file_value is None:
            raise ValueError(
                f"{path} records no pixel size for {what} ({recorded.source}). Pass um_per_px= (µm per pixel of "
                "the full-resolution level, e.g. 0.25 for a 40x scan, 0.5 for 20x) from the scanner's report."
            )
        return float(file_value)
    value = float(um_per_px)
    if not value > 0:
        raise ValueError(f"um_per_px must be a positive number of µm per pixel, got {um_per_px!r}.")
    if file_value is not None and abs(value / file_value - 1) > PIXEL_SIZE_TOLERANCE:
        warnings.warn(
            f"um_per_px={value:g} differs by {abs(value / file_value - 1):.0%} from the {file_value:g} µm/px that "
            f"{path} records ({recorded.source}); using the value passed.",
            UserWarning,
            stacklevel=3,
        )
    return value


def wsi(
    path: str | PathLike,
    *,
    image_key: str | None = None,
    um_per_px: float | None = None,
    series: int = 0,
    min_level_side: int = MIN_LEVEL_SIDE,
) -> SpatialData:
    """Read an H&E whole-slide image lazily as a multiscale image with its pixel size.

    The file is read with ``tifffile`` through its zarr interface: every pyramid level the file holds
    (SubIFDs, SVS / NDPI resolution pages, OME-TIFF sub-resolutions) becomes one level of the image
    element, as a dask array whose chunks are the file's tiles, so a tile read decodes only the tiles under
    its window and the slide is never decoded as a whole. Levels missing at the coarse end are added lazily
    by 2 x 2 averaging. tifffile was chosen over OpenSlide because it is already a dependency, reads the
    TIFF-based formats H&E slides come in (SVS, NDPI, OME-TIFF, generic pyramidal and BigTIFF) without a
    native library, and gives dask arrays directly; formats OpenSlide alone reads (MRXS, VSI, Leica SCN
    variants) must first be converted (e.g. to OME-TIFF). JPEG-compressed slides need ``imagecodecs``.
    Other image files (PNG, JPEG) are decoded into memory, and need ``um_per_px``.

    Parameters
    ----------
    path
        The slide: SVS, NDPI, OME-TIFF or (pyramidal, tiled) TIFF / BigTIFF.
    image_key
        Name of the image element; default the file name without its extension plus ``"_he"``.
    um_per_px
        Pixel size of the full-resolution level in µm/px. By default read from the file: OME
        ``PhysicalSizeX`` (with its unit), Aperio ``MPP`` in the SVS ``ImageDescription``, or the TIFF
        ``XResolution`` / ``YResolution`` tags with ``ResolutionUnit`` inch or cm. A value passed here wins;
        it warns when it differs from the file's by more than 5 %.
    series
        Image series of the file (0, the main image; SVS thumbnail / label / macro are later series).
    min_level_side
        Coarse levels are added until the coarsest level's short side is about this size (px).

    Returns
    -------
    SpatialData with one multiscale image ``image_key``, ``(c, y, x)`` RGB in the file's dtype (``uint8``
    for H&E scans), ``scale0`` the full resolution, ``Identity`` to the ``"global"`` coordinate system
    (level-0 pixels), and its µm/px recorded (:func:`genedml_sd.io.get_pixel_size`). It has no
    observations: lay spots on it with :func:`genedml_sd.pp.spot_grid`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file records no (plausible) pixel size and ``um_per_px`` is not passed, or is not a 2D RGB
        image; the message names the file.

    Notes
    -----
    Checked with tifffile 2026.3.3 on SubIFD pyramids (cm and inch resolution tags), Aperio SVS (JPEG tiles,
    ``MPP`` in the description), OME-TIFF (``PhysicalSizeX`` in µm and nm) and a 100,000 x 20,000 px slide
    (peak memory growth of reading it and two windows: a few MB).
    """
    from spatialdata import SpatialData

    path = Path(path)
    levels, recorded = image_levels_from_file(path, series=series)
    um = resolve_pixel_size(recorded, um_per_px, path)
    n_file = len(levels)
    levels = extend_levels(levels, min_level_side)
    key = image_key or element_name(path, "_he")
    sdata = SpatialData(images={key: multiscale_image(levels)})
    set_pixel_size(sdata, key, um)
    h, w = levels[0].shape[1:]
    logger.info(
        "Read %s lazily: %d x %d px at %.4g µm/px (%s), %d levels from the file + %d averaged, chunks %s",
        path,
        w,
        h,
        um,
        recorded.source if um_per_px is None else "passed um_per_px",
        n_file,
        len(levels) - n_file,
        levels[0].chunksize[1:],
    )
    return sdata
