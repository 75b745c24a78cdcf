"""Readers that return :class:`~spatialdata.SpatialData`, and the pixel-size helpers.

Every reader returns the same kind of object: an H&E multiscale image ``(c, y, x)`` whose pixel size
(µm/px of ``scale0``) is recorded for :func:`get_pixel_size`, and, for spatial transcriptomics, the
observations as a shapes element (spots, bins or cells of their true size) with a raw-counts table
annotating them; ``table.uns["genedml_sd"]`` holds the sample metadata (``patient``, ``section``,
``platform``, ``observation`` = ``"spot"`` / ``"bin"`` / ``"cell"`` and its size ``observation_um``).
:func:`wsi` reads an H&E-only whole-slide image lazily.
"""

from genedml_sd._spatial import get_pixel_size, set_pixel_size

from ._build import pixel_size_from_lattice
from ._hest import hest
from ._legacy_st import her2st, legacy_st
from ._visium import record_pixel_sizes_from_spots as estimate_pixel_size
from ._visium import visium
from ._visium_hd import visium_hd
from ._wsi import wsi
from ._xenium import xenium

__all__ = [
    "estimate_pixel_size",
    "get_pixel_size",
    "her2st",
    "hest",
    "legacy_st",
    "pixel_size_from_lattice",
    "set_pixel_size",
    "visium",
    "visium_hd",
    "wsi",
    "xenium",
]
