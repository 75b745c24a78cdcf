"""µm-aware multi-scale tiles around spots and on a slide lattice, read lazily from image pyramids.

The local tile (112 µm, 224 px) and the neighbour grid (5 x 5 such tiles) of every spot are cut
from the pyramid level closest to, and not coarser than, the target resolution, via
xarray/dask windows; the whole image is never computed. :class:`SlideReader` does the reading
(level choice, ``uint8``/``uint16``/float pixel values, anti-aliased resampling) for both the
:class:`SpotTiler` and the slide-lattice :class:`LatticeTiler`.
"""

from ._dataset import SpotTileBatches, tile_loader
from ._geometry import TileGeometry
from ._lattice import LATTICE_VERSION, LatticePlan, LatticeTiler, lattice_pitch_px, plan_lattice
from ._reader import LevelChoice, SlideReader, choose_level
from ._tiler import CentredTiler, SpotTiler

__all__ = [
    "LATTICE_VERSION",
    "CentredTiler",
    "LatticePlan",
    "LatticeTiler",
    "LevelChoice",
    "SlideReader",
    "SpotTileBatches",
    "SpotTiler",
    "TileGeometry",
    "choose_level",
    "lattice_pitch_px",
    "plan_lattice",
    "tile_loader",
]
