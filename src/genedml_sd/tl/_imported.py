"""Features computed elsewhere: tile embeddings stored as a table of the SpatialData (sopa, LazySlide).

sopa's ``sopa.patches.compute_embeddings`` and LazySlide's ``zs.tl.feature_extraction`` both write a
table whose rows are tiles: it annotates a shapes element of tile polygons (sopa:
``"embeddings_patches"``, table ``"<model>_embeddings"`` with ``uns["embedding_config"]``; LazySlide /
wsidata: ``"tiles"``, table ``"<model>_tiles"`` with ``obs["tile_id"]`` and ``obs["library_id"]``), and
``X`` holds one embedding per tile (n_tiles, D). :func:`table_features` maps such a table onto the
observations of a slide by position, the way the dense feature mode reads its own tile lattice:

* local feature of an observation: the embedding of the tile whose centre is nearest to the
  observation's centre (the tile covering it, on a lattice);
* neighbour grid (``grid x grid`` tokens, row-major as everywhere else): the tiles at the lattice
  offsets ``(-grid//2 .. grid//2) x stride`` around that home tile, so all observations of one tile
  share one grid; a lattice position with no tile (outside the tissue sopa or LazySlide kept) gets
  the mean embedding of the slide (zero after the model's feature standardisation).

The lattice stride is the median distance from each tile centre to its nearest other tile centre
(``patch_width - patch_overlap`` for sopa). Positions are compared in the pixel frame of the image's
full-resolution level, through the elements' coordinate transformations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import (
    feature_table_source,
    get_pixel_size,
    resolve_key,
    spots_to_pixels,
    table_regions,
    table_rows_for_shapes,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import SpotFeatures

MATCH_TOLERANCE = 0.5
"""A lattice position is matched to a tile whose centre lies within this fraction of the stride."""


@dataclass(frozen=True)
class FeatureTable:
    """What a table of precomputed tile embeddings holds.

    Attributes
    ----------
    key
        The table's name in ``sdata.tables``.
    source
        ``"sopa"``, ``"lazyslide"`` or ``"table"`` (any other table annotating tile polygons).
    model_name
        The encoder that made the embeddings, as the producing tool recorded it (sopa:
        ``uns["embedding_config"]["model_name"]``; LazySlide: the table key without the
        ``"_<tile_key>"`` suffix; otherwise the table key).
    tiles_key
        The shapes element of tiles the table annotates.
    dim
        Embedding width D.
    n_tiles
        Number of tiles (rows).
    """

    key: str
    source: str
    model_name: str
    tiles_key: str
    dim: int
    n_tiles: int

    @property
    def encoder_name(self) -> str:
        """``"<source>:<model_name>"``, the name recorded as the model's encoder."""
        return f"{self.source}:{self.model_name}"


def describe_feature_table(sdata: SpatialData, features_key: str) -> FeatureTable:
    """Inspect a table of tile embeddings.

    Parameters
    ----------
    sdata
        The SpatialData (a LazySlide ``WSIData`` is one).
    features_key
        Name of the table.

    Returns
    -------
    The :class:`FeatureTable`.

    Raises
    ------
    KeyError
        No such table (the message lists the tables).
    ValueError
        The table does not annotate exactly one shapes element of this SpatialData, or its ``X`` is
        not a finite numeric matrix.
    """
    key = resolve_key(sdata, "tables", features_key, what="features_key")
    table = sdata.tables[key]
    regions = table_regions(table)
    if len(regions) != 1 or regions[0] not in sdata.shapes:
        raise ValueError(
            f"Feature table {key!r} must annotate exactly one shapes element of tiles, but its region is "
            f"{regions} (shapes: {list(sdata.shapes)})."
        )
    tiles_key = regions[0]
    source = feature_table_source(table) or "table"
    if source == "sopa":
        model_name = str(table.uns["embedding_config"].get("model_name") or key)
    elif source == "lazyslide" and key.endswith(f"_{tiles_key}"):
        model_name = key[: -len(tiles_key) - 1]
    else:
        model_name = key
    if table.n_vars < 1 or not np.issubdtype(np.asarray(table.X[:1]).dtype, np.number):
        raise ValueError(f"Feature table {key!r} must hold numeric embeddings in X, got shape {table.shape}.")
    return FeatureTable(key, source, model_name, tiles_key, int(table.n_vars), int(table.n_obs))


def table_features(
    sdata: SpatialData,
    features_key: str,
    *,
    image_key: str,
    shapes_key: str,
    grid: int = 5,
    neighbours: bool = True,
) -> SpotFeatures:
    """Local and neighbour features of the observations from a table of tile embeddings.

    Parameters
    ----------
    sdata
        The SpatialData holding the image, the observations and the feature table.
    features_key
        The table of tile embeddings (see :func:`describe_feature_table`).
    image_key
        The image the tiles were cut from (its full-resolution pixel frame and µm/px).
    shapes_key
        The observations (spots, bins, cells).
    grid
        Side of the neighbour grid (odd).
    neighbours
        Also build the neighbour grids.

    Returns
    -------
    :class:`~genedml_sd.encoders.SpotFeatures` with ``mode="table"``: ``local`` (N, D) float32,
    ``coords_um`` (N, 2) in µm of the image's full-resolution pixel frame and, with ``neighbours``,
    ``tokens`` (n_tiles + 1, D) (the last row is the slide's mean embedding, for lattice positions
    without a tile) and ``token_index`` (N, grid**2). ``n_encoded_tiles`` is 0: nothing is encoded.

    Raises
    ------
    ValueError
        Non-finite embeddings, fewer than two tiles, a tile table row missing for a tile, or an even ``grid``.
    """
    from scipy.spatial import cKDTree

    from genedml_sd.encoders import SpotFeatures

    if grid < 1 or grid % 2 == 0:
        raise ValueError(f"grid must be a positive odd number, got {grid}.")
    info = describe_feature_table(sdata, features_key)
    table = sdata.tables[info.key]
    tiles = sdata[info.tiles_key]
    rows = table_rows_for_shapes(table, tiles, info.tiles_key, info.key)
    x = table.X[rows]
    emb = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise ValueError(f"Feature table {info.key!r} has {bad} tiles with non-finite embeddings.")
    if len(emb) < 2:
        raise ValueError(f"Feature table {info.key!r} has {len(emb)} tile(s); a lattice needs at least two.")

    tile_px = spots_to_pixels(sdata, info.tiles_key, image_key)
    obs_px = spots_to_pixels(sdata, shapes_key, image_key)
    tree = cKDTree(tile_px)
    nearest, _ = tree.query(tile_px, k=2)
    stride = float(np.median(nearest[:, 1]))
    if not stride > 0:
        raise ValueError(f"The tiles of {info.tiles_key!r} have duplicate centres; cannot find the lattice stride.")
    _, home = tree.query(obs_px, k=1)
    home = np.asarray(home, dtype=np.int64)
    local = emb[home]

    tokens = token_index = None
    if neighbours:
        half = grid // 2
        steps = np.arange(-half, half + 1, dtype=np.float64) * stride
        dy, dx = np.meshgrid(steps, steps, indexing="ij")  # row-major: token t = row * grid + col
        offsets = np.column_stack([dx.ravel(), dy.ravel()])
        # one grid per home tile: look the lattice positions up once per tile used
        used, inverse = np.unique(home, return_inverse=True)
        targets = tile_px[used][:, None, :] + offsets[None]
        dist, idx = tree.query(targets.reshape(-1, 2), k=1)
        idx = np.where(dist <= MATCH_TOLERANCE * stride, idx, len(emb)).reshape(len(used), grid * grid)
        token_index = idx[inverse].astype(np.int64)
        tokens = np.vstack([emb, emb.mean(axis=0, keepdims=True)]).astype(np.float32)

    um_per_px = get_pixel_size(sdata, image_key)
    digest = hashlib.sha256()
    for part in (info.key, info.encoder_name, str(emb.shape), str(stride), str(grid), str(neighbours)):
        digest.update(part.encode())
    digest.update(np.ascontiguousarray(emb[: min(len(emb), 64)]).tobytes())
    return SpotFeatures(
        local=np.ascontiguousarray(local),
        neighbour=None,
        coords_um=(obs_px * um_per_px).astype(np.float64),
        spot_ids=sdata[shapes_key].index.to_numpy(),
        key=f"table-{digest.hexdigest()[:20]}",
        n_encoded_tiles=0,
        mode="table",
        tokens=tokens,
        token_index=token_index,
    )


def table_summary(sdata: SpatialData, features_key: str) -> dict[str, Any]:
    """Plain-dict description of a feature table (recorded on the model trained on it)."""
    info = describe_feature_table(sdata, features_key)
    table = sdata.tables[info.key]
    out: dict[str, Any] = {
        "key": info.key,
        "source": info.source,
        "model_name": info.model_name,
        "tiles_key": info.tiles_key,
        "dim": info.dim,
    }
    config = table.uns.get("embedding_config")
    if isinstance(config, dict):  # sopa: patch width / overlap (px of its level), level, magnification
        out["embedding_config"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
    spec = (getattr(sdata, "attrs", None) or {}).get("tile_spec", {})
    if isinstance(spec, dict) and info.tiles_key in spec:  # LazySlide / wsidata: the tile spec of the tile key
        out["tile_spec"] = dict(spec[info.tiles_key])
    return out
