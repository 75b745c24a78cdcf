"""Dense features: one feature per observation at its own position, from a tile lattice encoded once.

For observations smaller than, or as dense as, a tile (Visium HD 8 µm bins, Xenium cells, dense
grids) cutting one ``tile_um`` tile per observation costs one encoder call per observation. The
dense mode encodes the slide lattice of :func:`~genedml_sd.tiling.plan_lattice` (pitch
``tile_um``, origin at level-0 pixel ``(0, 0)``, the lattice of the ``"lattice"`` mode) once and
gives each observation a local feature read at its position inside the lattice tile containing its
centre: the bilinear interpolation of that tile's token grid (:meth:`FrozenEncoder.token_grid`,
8 µm cells for a 112 µm tile and a ViT-x/16 encoder), or that tile's pooled feature for encoders
without a token grid. Encoder calls then grow with tissue area, not with the number of observations.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

from genedml_sd._settings import settings
from genedml_sd.tiling import LatticePlan, LatticeTiler, SpotTiler, TileGeometry, plan_lattice
from genedml_sd.tiling import tile_loader as _tile_loader

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from ._frozen import FrozenEncoder

logger = logging.getLogger(__name__)

DENSE_VERSION = "dense-v1"
"""Identity of the dense feature definition (containing lattice tile, bilinear token interpolation); in cache keys."""


def dense_plan(tiler: SpotTiler, neighbours: bool) -> LatticePlan:
    """The lattice plan of the dense mode: ``grid x grid`` blocks with neighbours, else the containing tiles only.

    Parameters
    ----------
    tiler
        The observations' tiler (centres, pixel size, geometry).
    neighbours
        Plan the ``grid x grid`` neighbour block of every observation; otherwise a ``1 x 1`` plan
        (only the lattice tiles containing an observation).

    Returns
    -------
    The plan; ``plan.home`` is the lattice tile containing each observation's centre.
    """
    g = tiler.geometry if neighbours else dataclasses.replace(tiler.geometry, grid=1)
    return plan_lattice(tiler.centres_px(0), tiler.um_per_px0, g)


def tile_fractions(tiler: SpotTiler, plan: LatticePlan) -> np.ndarray:
    """Position of each observation's centre inside its containing lattice tile, float64 (n_obs, 2).

    ``(x, y)`` as fractions of the tile side in ``[0, 1)``: ``(0, 0)`` is the tile's top-left corner.
    """
    return tiler.centres_px(0) / plan.pitch_px - plan.cells[plan.home]


def sample_grid(grid: torch.Tensor, tile: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of token grids at positions inside their tiles.

    The same values as :func:`torch.nn.functional.grid_sample` with ``align_corners=False`` and
    ``padding_mode="border"`` (cell ``(v, u)`` centred at ``((u + 0.5) / w, (v + 0.5) / h)``,
    positions clamped to the border cells), without copying a grid per sample.

    Parameters
    ----------
    grid
        Token grids (B, D, h, w).
    tile
        Grid (row of ``grid``) of each sample, int64 (n,).
    frac
        Sample positions ``(x, y)`` as fractions of the tile side, (n, 2).

    Returns
    -------
    Samples float32 (n, D).
    """
    _, _, h, w = grid.shape
    frac = frac.detach().cpu().double()  # positions in float64 on the host (any device lacks it)
    x = (frac[:, 0] * w - 0.5).clamp(0, w - 1)
    y = (frac[:, 1] * h - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    wx, wy = ((x - x0).float()[:, None], (y - y0).float()[:, None])
    dev = grid.device
    x0, x1, y0, y1, wx, wy = (t.to(dev) for t in (x0, x1, y0, y1, wx, wy))
    tile = tile.to(dev).long()
    grid = grid.float()

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return grid[tile, :, yy, xx]  # (n, D)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def extract_dense(
    tiler: SpotTiler,
    encoder: FrozenEncoder,
    neighbours: bool,
    dev: torch.device,
    precision: str,
    batch_size: int,
    encode_batch_size: int,
    loader_kw: dict,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int, dict]:
    """Dense-mode features: ``(local, tokens, token_index, n_encoded_tiles, meta)``, see :func:`extract_features`.

    Every lattice tile of the plan is encoded once, in ``batch_size * grid**2``-tile batches; the
    observations of the tiles of an encoder chunk get their local features while that chunk's token
    grids are in memory, so memory stays bounded by the chunk plus the outputs.
    """
    import torch
    from tqdm.auto import tqdm

    from ._frozen import autocast_context as _autocast

    g = tiler.geometry
    plan = dense_plan(tiler, neighbours)
    home = plan.home
    frac = tile_fractions(tiler, plan)
    interp = bool(getattr(encoder, "has_token_grid", False))
    # observations grouped by containing tile: those of tile k are order[starts[k]:starts[k + 1]]
    order = np.argsort(home, kind="stable")
    starts = np.searchsorted(home[order], np.arange(plan.n_tiles + 1))
    counts = np.diff(starts)
    dim = int(encoder.embed_dim)
    tokens = np.zeros((plan.n_tiles, dim), dtype=np.float32)
    local = np.zeros((tiler.n_spots, dim), dtype=np.float32)
    grid_hw: list[int] | None = None
    lattice = LatticeTiler.from_plan(tiler, plan)
    desc = f"encoding {tiler.image_key} dense ({encoder.name})"
    bar = tqdm(total=plan.n_tiles, desc=desc, disable=not settings.progress)
    for batch in _tile_loader(lattice, "local", batch_size=batch_size * g.n_neighbours, **loader_kw):
        idx = batch["index"].numpy()
        tiles = batch["tiles"]
        for start in range(0, len(idx), encode_batch_size):
            rows = idx[start : start + encode_batch_size]
            x = tiles[start : start + encode_batch_size].to(dev, non_blocking=True)
            with torch.inference_mode(), _autocast(dev, precision):
                if interp:
                    pooled, grid = encoder.token_grid(x)
                    grid_hw = [int(grid.shape[2]), int(grid.shape[3])]
                else:
                    pooled, grid = encoder(x), None
                pooled = pooled.float()
                tokens[rows] = pooled.cpu().numpy()
                obs = np.concatenate([order[starts[k] : starts[k + 1]] for k in rows]) if len(rows) else order[:0]
                if len(obs):
                    chunk_row = np.repeat(np.arange(len(rows)), counts[rows])  # row in this chunk of each obs
                    if grid is not None:
                        pos = torch.from_numpy(frac[obs])
                        local[obs] = sample_grid(grid, torch.from_numpy(chunk_row), pos).cpu().numpy()
                    else:
                        local[obs] = tokens[rows][chunk_row]
        bar.update(len(idx))
    bar.close()
    n_encoded = plan.n_tiles
    logger.info(
        "Dense features of %s: %d lattice tiles encoded for %d observations (%.4g encoder calls per observation; "
        "local features %s).",
        tiler.image_key,
        n_encoded,
        tiler.n_spots,
        n_encoded / max(tiler.n_spots, 1),
        "interpolated from token grids" if interp else "pooled per containing tile",
    )
    meta = {
        "lattice": plan.meta(tiler.um_per_px0, g, grid=g.grid if neighbours else 1),
        "dense": {
            "version": DENSE_VERSION,
            "token_interpolation": interp,
            "token_grid": grid_hw,
            "n_home_tiles": int((counts > 0).sum()),
        },
    }
    if not neighbours:
        return local, None, None, n_encoded, meta
    return local, tokens, np.ascontiguousarray(plan.token_index, dtype=np.int64), n_encoded, meta


def encoder_calls(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    geometry: TileGeometry | None = None,
    neighbours: bool = True,
) -> dict[str, int]:
    """Tiles each feature mode of :func:`~genedml_sd.encoders.extract_features` would encode for one slide, without reading pixels.

    Computed from the image metadata and the observation centres only (vectorised: about 1 s for
    10^6 observations), e.g. to choose a mode before encoding.

    Parameters
    ----------
    sdata
        SpatialData with the image and the observations; not modified.
    image_key, shapes_key
        Elements to use; inferred when unambiguous.
    geometry
        Tile geometry (µm, px); the paper's by default.
    neighbours
        Count the ``grid x grid`` neighbour tokens too, as ``extract_features(..., neighbours=...)``.

    Returns
    -------
    ``{"spot": ..., "lattice": ..., "dense": ...}``: ``"spot"`` is ``N * grid**2`` (``N`` without
    neighbours) for ``N`` observations, ``"lattice"`` the lattice tiles of all neighbour blocks plus
    one exact local tile per observation off the lattice centres (``N`` without neighbours),
    ``"dense"`` the lattice tiles of all neighbour blocks (of the containing tiles only, without
    neighbours). Equal to ``n_encoded_tiles`` of the extraction.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a coarse-image warning is for the extraction to give
        tiler = SpotTiler(sdata, image_key, shapes_key, geometry)
    n = tiler.n_spots
    g = tiler.geometry
    if not neighbours:
        return {"spot": n, "lattice": n, "dense": dense_plan(tiler, False).n_tiles}
    plan = dense_plan(tiler, True)
    off = int((~plan.on_lattice).sum())
    return {"spot": n * g.n_neighbours, "lattice": plan.n_tiles + off, "dense": plan.n_tiles}
