"""Readers that return :class:`~spatialdata.SpatialData`, and the pixel-size helpers.

Every reader returns an H&E pyramid, the spots as circles with their true radius and a raw-counts
table annotating them, with the image's pixel size (µm/px) recorded for :func:`get_pixel_size`.
"""

from genedml_sd._spatial import get_pixel_size, set_pixel_size

from ._build import pixel_size_from_lattice
from ._hest import hest
from ._legacy_st import her2st, legacy_st
from ._visium import record_pixel_sizes_from_spots as estimate_pixel_size
from ._visium import visium

__all__ = [
    "estimate_pixel_size",
    "get_pixel_size",
    "her2st",
    "hest",
    "legacy_st",
    "pixel_size_from_lattice",
    "set_pixel_size",
    "visium",
]
