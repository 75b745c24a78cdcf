"""Multi-scale tiles around spots, read lazily from an image pyramid.

A :class:`SpotTiler` maps spot centres through the coordinate transformations into the level-0
pixel frame of the image and reads, through a :class:`~genedml_sd.tiling.SlideReader`, the local
tile and the neighbour grid of each spot at the tile geometry's µm/px (pyramid level closest to,
and not coarser than, that resolution; one small window per spot; anti-aliased resampling; white
padding at the borders). :class:`CentredTiler` is the same reading for any set of level-0 centres;
the slide lattice (:class:`~genedml_sd.tiling.LatticeTiler`) is one.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from genedml_sd._spatial import check_observations, resolve_key, spots_to_pixels

from ._geometry import TileGeometry
from ._reader import LevelChoice, SlideReader

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

COARSE_WARNING_RATIO = 4.0
"""Warn when the requested µm/px is finer than the image's own by more than this factor."""


class CentredTiler:
    """Local tiles and neighbour grids centred on given level-0 points of one slide.

    Parameters
    ----------
    reader
        The slide's image pyramid.
    geometry
        Tile sizes (µm, px).
    centres_px0
        Tile centres ``(x, y)`` in level-0 continuous pixel coordinates, (n, 2).
    ids
        Identifier of each centre (default ``0..n-1``).

    Attributes
    ----------
    n_spots
        Number of centres.
    spot_ids
        Their identifiers.
    """

    def __init__(
        self, reader: SlideReader, geometry: TileGeometry, centres_px0: np.ndarray, ids: np.ndarray | None = None
    ) -> None:
        self.reader = reader
        self.geometry = geometry
        self._xy0 = np.asarray(centres_px0, dtype=np.float64).reshape(-1, 2)
        self.n_spots = len(self._xy0)
        self.spot_ids = np.arange(self.n_spots) if ids is None else np.asarray(ids)

    # ------------------------------------------------------------------------------------------ the slide
    @property
    def image_key(self) -> str:
        """Name of the image element."""
        return self.reader.image_key

    @property
    def levels(self) -> list[xr.DataArray]:
        """Pyramid levels of the image, finest first."""
        return self.reader.levels

    @property
    def um_per_px0(self) -> float:
        """Pixel size of level 0, µm/px."""
        return self.reader.um_per_px0

    @property
    def levels_um_per_px(self) -> np.ndarray:
        """µm/px of each level along ``(y, x)``, (n_levels, 2)."""
        return self.reader.levels_um_per_px

    # ------------------------------------------------------------------------------------------ geometry
    def level_for(self, um_per_px: float) -> LevelChoice:
        """The pyramid level read for tiles at ``um_per_px``."""
        return self.reader.level_for(um_per_px)

    def centres_px(self, level: int = 0) -> np.ndarray:
        """Centres in continuous pixel coordinates of ``level``, shape (n_spots, 2) as ``(x, y)``."""
        return self.reader.to_level(self._xy0, level)

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
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_spots):
            raise IndexError(f"Spot indices must lie in [0, {self.n_spots}), got {idx.min()}..{idx.max()}.")
        return self.reader.read_regions(self._xy0[idx], side_um, out_px, scheduler=scheduler)

    def iter_batches(
        self, kind: str, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, tiles)`` batches of ``kind`` ``"local"`` or ``"neighbour"`` tiles in spot order."""
        order = np.arange(self.n_spots) if indices is None else np.asarray(indices)
        read = {"local": self.local_tiles, "neighbour": self.neighbour_tiles}[kind]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, read(chunk)


class SpotTiler(CentredTiler):
    """Cut tiles (local) and tile grids (neighbour region) around the spots of a SpatialData object.

    Parameters
    ----------
    sdata
        The SpatialData object; it is not modified.
    image_key
        Image element (single-scale or multiscale). Its pixel size must be recorded, see
        :func:`genedml_sd.io.set_pixel_size`. Pixel values ``uint8``, ``uint16`` or float in
        ``[0, 1]`` (see :class:`~genedml_sd.tiling.SlideReader`); tiles are ``uint8``.
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
        image_key = resolve_key(sdata, "images", image_key)
        self.shapes_key = resolve_key(sdata, "shapes", shapes_key)
        geometry = geometry or TileGeometry()
        check_observations(sdata[self.shapes_key], self.shapes_key)
        reader = SlideReader.from_sdata(sdata, image_key)

        xy0 = spots_to_pixels(sdata, self.shapes_key, image_key, level=0)
        h0, w0 = reader.shape_px0
        off = ~((xy0[:, 0] >= 0) & (xy0[:, 0] <= w0) & (xy0[:, 1] >= 0) & (xy0[:, 1] <= h0))
        if off.any():
            ids = list(sdata[self.shapes_key].index[off][:5])
            raise ValueError(
                f"{int(off.sum())} spots of {self.shapes_key!r} lie outside image {image_key!r} "
                f"({w0} x {h0} px), e.g. ids {ids}; check the elements' coordinate transformations."
            )
        super().__init__(reader, geometry, xy0, sdata[self.shapes_key].index.to_numpy())

        target = self.geometry.um_per_px
        own = float(self.levels_um_per_px[0].max())
        if own > COARSE_WARNING_RATIO * target:
            warnings.warn(
                f"Tiles of {target:g} µm/px requested from image {self.image_key!r}, whose finest level is "
                f"{own:.3g} µm/px: tiles will be upsampled {own / target:.1f}x and carry less detail.",
                UserWarning,
                stacklevel=2,
            )
