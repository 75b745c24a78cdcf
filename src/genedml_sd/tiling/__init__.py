"""µm-aware multi-scale tiles around spots, read lazily from image pyramids.

The local tile (112 µm, 224 px) and the neighbour grid (5 x 5 such tiles) of every spot are cut
from the pyramid level closest to, and not coarser than, the target resolution, via
xarray/dask windows; the whole image is never computed.
"""

from ._dataset import SpotTileBatches, tile_loader
from ._geometry import TileGeometry
from ._tiler import SpotTiler, choose_level

__all__ = ["SpotTileBatches", "SpotTiler", "TileGeometry", "choose_level", "tile_loader"]
