"""Tables of tile embeddings in the layouts sopa and LazySlide write, computed here from real pixels.

Neither tool is a dependency, so these functions add to a SpatialData exactly the elements that

* sopa's ``sopa.patches.compute_embeddings`` (sopa 2.x, ``sopa/patches/infer.py`` and
  ``sopa/patches/patches.py``) adds: a shapes element ``"embeddings_patches"`` of axis-aligned patch
  boxes in the pixel frame of the image level used, with that level's transformations; a table
  ``"<model_name>_embeddings"`` (or ``key_added``) with one row per patch, ``X`` (n_patches, D),
  ``obs["region"] = "embeddings_patches"``, ``obs["instance"]`` = the patches' index, those two as
  region / instance keys, ``obsm["spatial"]`` the patch centres and ``uns["embedding_config"]``
  (``patch_width``, ``patch_overlap``, ``magnification``, ``level``, ``level_downsample``,
  ``tile_resize_factor``, ``model_name``);
* wsidata's ``add_tiles`` / ``add_features`` (used by LazySlide's ``zs.pp.tile_tissues`` and
  ``zs.tl.feature_extraction``, ``wsidata/io/_elems.py``) add: a shapes element ``"tiles"`` of boxes in
  level-0 pixels (the image's transformations; identity in a ``WSIData``) with columns ``tile_id``, ``x``, ``y`` (top-left corner), ``tissue_id``; the tile spec
  in ``sdata.attrs["tile_spec"]["tiles"]``; a table ``"<model>_tiles"`` with ``obs["tile_id"]``,
  ``obs["library_id"] = "tiles"`` (categorical), index ``tile_id`` as strings, region key
  ``library_id`` and instance key ``tile_id``.

The embeddings come from any :class:`~genedml_sd.encoders.FrozenEncoder` run on the real tiles, so
tests and tutorials exercise the mapping on genuine image features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder


def _lattice(width: int, height: int, side: int, stride: int) -> np.ndarray:
    """Top-left corners ``(x, y)`` of a row-major lattice of ``side`` px tiles with ``stride`` px over an image."""
    xs = np.arange(0, max(width - side, 0) + 1, stride)
    ys = np.arange(0, max(height - side, 0) + 1, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.column_stack([xx.ravel(), yy.ravel()]).astype(np.int64)


def _encode(
    sdata: SpatialData, image_key: str, encoder: FrozenEncoder, centres_px: np.ndarray, side_px: int
) -> np.ndarray:
    import torch

    from genedml_sd._spatial import get_pixel_size
    from genedml_sd.tiling import SlideReader

    reader = SlideReader.from_sdata(sdata, image_key)
    side_um = side_px * get_pixel_size(sdata, image_key)
    out = []
    with torch.inference_mode():
        for start in range(0, len(centres_px), 64):
            tiles = reader.read_regions(centres_px[start : start + 64], side_um, encoder.spec.input_px)
            out.append(encoder(torch.from_numpy(tiles)).float().numpy())
    return np.vstack(out).astype(np.float32)


def _keep_near(corners: np.ndarray, side: int, points_px: np.ndarray | None, margin_px: float) -> np.ndarray:
    """Tiles whose box, grown by ``margin_px``, holds at least one of ``points_px`` (all tiles when ``None``)."""
    if points_px is None:
        return np.ones(len(corners), dtype=bool)
    from scipy.spatial import cKDTree

    centres = corners + side / 2
    dist, _ = cKDTree(points_px).query(centres, k=1)
    return dist <= side / np.sqrt(2) + margin_px


def _tile_corners(
    sdata: SpatialData, image_key: str, side: int, stride: int, near_shapes: str | None, margin_px: float
) -> np.ndarray:
    """Top-left corners (x, y), level-0 px, of the lattice tiles over the image kept near ``near_shapes``."""
    from genedml_sd._spatial import image_levels, spots_to_pixels

    level0 = image_levels(sdata[image_key])[0]
    corners = _lattice(int(level0.sizes["x"]), int(level0.sizes["y"]), side, stride)
    points = None if near_shapes is None else spots_to_pixels(sdata, near_shapes, image_key)
    return corners[_keep_near(corners, side, points, margin_px)]


def add_sopa_embeddings(
    sdata: SpatialData,
    encoder: FrozenEncoder,
    *,
    image_key: str,
    patch_width: int = 224,
    patch_overlap: int = 0,
    model_name: str | None = None,
    key_added: str | None = None,
    near_shapes: str | None = None,
    margin_px: float = 0.0,
) -> str:
    """Add patches and their embeddings as sopa's ``compute_embeddings`` (level 0) does.

    Parameters
    ----------
    sdata
        The SpatialData; gains the shapes ``"embeddings_patches"`` and the table.
    encoder
        Encoder of the patches (tiles resampled to its input size).
    image_key
        The image the patches are cut from (level 0).
    patch_width, patch_overlap
        Patch side and overlap, px of level 0 (sopa's arguments of the same names).
    model_name
        Recorded in ``uns["embedding_config"]["model_name"]`` (default: the encoder's name).
    key_added
        Table name (default ``"<model_name>_embeddings"``, as sopa).
    near_shapes
        Keep only the patches near this shapes element (as sopa's region of interest keeps the tissue).
    margin_px
        Extra distance (px) around ``near_shapes`` within which patches are kept.

    Returns
    -------
    The table's name.
    """
    import geopandas as gpd
    import pandas as pd
    from anndata import AnnData
    from shapely import box
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    corners = _tile_corners(sdata, image_key, patch_width, patch_width - patch_overlap, near_shapes, margin_px)
    boxes = [box(x, y, x + patch_width, y + patch_width) for x, y in corners]
    patches = ShapesModel.parse(
        gpd.GeoDataFrame({"geometry": boxes}), transformations=get_transformation(sdata[image_key], get_all=True)
    )
    sdata.shapes["embeddings_patches"] = patches
    centres = corners + patch_width / 2.0
    emb = _encode(sdata, image_key, encoder, centres, patch_width)
    name = model_name or encoder.name
    adata = AnnData(emb)
    adata.obs["region"] = pd.Categorical(["embeddings_patches"] * len(emb))
    adata.obs["instance"] = patches.index.values
    adata = TableModel.parse(adata, region="embeddings_patches", region_key="region", instance_key="instance")
    adata.obsm["spatial"] = centres.astype(np.float64)
    adata.uns["embedding_config"] = {
        "patch_width": patch_width,
        "patch_overlap": patch_overlap,
        "magnification": None,
        "level": 0,
        "level_downsample": 1.0,
        "tile_resize_factor": 1.0,
        "model_name": name,
    }
    key = key_added or f"{name}_embeddings"
    sdata.tables[key] = adata
    return key


def add_lazyslide_features(
    sdata: SpatialData,
    encoder: FrozenEncoder,
    *,
    image_key: str,
    tile_px: int = 224,
    stride_px: int | None = None,
    model_name: str | None = None,
    tile_key: str = "tiles",
    near_shapes: str | None = None,
    margin_px: float = 0.0,
) -> str:
    """Add tiles and their features as LazySlide's ``tile_tissues`` + ``feature_extraction`` (wsidata) do.

    Parameters
    ----------
    sdata
        The SpatialData (a LazySlide ``WSIData`` is one); gains the shapes ``tile_key``, its tile spec in
        ``attrs["tile_spec"]`` and the table ``"<model_name>_<tile_key>"``.
    encoder
        Encoder of the tiles.
    image_key
        The image (level 0 pixels).
    tile_px, stride_px
        Tile side and stride, px of level 0 (default stride: the side, no overlap).
    model_name
        Model name in the table key (default: the encoder's name).
    tile_key
        Name of the tiles element.
    near_shapes, margin_px
        Keep only tiles near this shapes element (LazySlide tiles the tissue only).

    Returns
    -------
    The table's name.
    """
    import geopandas as gpd
    import pandas as pd
    from anndata import AnnData
    from shapely import box
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    from genedml_sd._spatial import get_pixel_size

    stride = int(stride_px or tile_px)
    corners = _tile_corners(sdata, image_key, tile_px, stride, near_shapes, margin_px)
    gdf = gpd.GeoDataFrame(
        {
            "tile_id": np.arange(len(corners)),
            "x": corners[:, 0],
            "y": corners[:, 1],
            "tissue_id": np.zeros(len(corners), dtype=np.int64),
            "geometry": [box(x, y, x + tile_px, y + tile_px) for x, y in corners],
        }
    )
    # level-0 pixels; a WSIData's image maps to its coordinate system by the identity, so keep the image's map
    sdata.shapes[tile_key] = ShapesModel.parse(gdf, transformations=get_transformation(sdata[image_key], get_all=True))
    mpp = get_pixel_size(sdata, image_key)
    spec = {
        "height": tile_px,
        "width": tile_px,
        "stride_height": stride,
        "stride_width": stride,
        "mpp": mpp,
        "ops_level": 0,
        "ops_downsample": 1.0,
        "base_height": tile_px,
        "base_width": tile_px,
        "base_stride_height": stride,
        "base_stride_width": stride,
        "tissue_name": "tissues",
    }
    sdata.attrs.setdefault("tile_spec", {})[tile_key] = spec
    emb = _encode(sdata, image_key, encoder, corners + tile_px / 2.0, tile_px)
    tile_id = gdf["tile_id"].to_numpy()
    obs = pd.DataFrame(
        {"tile_id": tile_id, "library_id": pd.Categorical([tile_key] * len(tile_id))}, index=tile_id.astype(str)
    )
    table = TableModel.parse(AnnData(X=emb, obs=obs), region=tile_key, region_key="library_id", instance_key="tile_id")
    key = f"{model_name or encoder.name}_{tile_key}"
    sdata.tables[key] = table
    return key
