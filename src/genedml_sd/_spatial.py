"""Small shared helpers over SpatialData: key resolution, pixel size, spot geometry.

Everything that needs to know *where* things are in a :class:`~spatialdata.SpatialData` object goes
through this module, so that the rest of the package sees plain arrays:

- :func:`resolve_key` picks an element by name or infers it when unambiguous;
- :func:`get_pixel_size` / :func:`set_pixel_size` read and record the physical pixel size (µm/px) of
  an image's full-resolution level (``scale0``); it is stored in ``sdata.attrs`` so it survives
  :meth:`~spatialdata.SpatialData.write` / :func:`~spatialdata.read_zarr`;
- :func:`image_levels` lists the pyramid levels of an image element;
- :func:`spots_to_pixels` maps spot centres through the elements' coordinate transformations into
  the pixel frame of one pyramid level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

ATTRS_KEY = "genedml_sd"
"""Key of this package's entry in ``sdata.attrs`` and in ``table.uns``."""

PREDICTIONS_KIND = "predictions"
"""Value of ``table.uns["genedml_sd"]["kind"]`` in tables written by :func:`genedml_sd.tl.predict`."""

ElementKind = Literal["images", "shapes", "tables"]


def resolve_key(sdata: SpatialData, kind: ElementKind, key: str | None, *, what: str | None = None) -> str:
    """Return ``key`` if it names an element of ``kind``, or infer the only candidate.

    Parameters
    ----------
    sdata
        The SpatialData object.
    kind
        ``"images"``, ``"shapes"`` or ``"tables"``.
    key
        The user's choice, or ``None`` to infer it.
    what
        Name of the argument, used in error messages (default ``image_key`` etc.).

    Returns
    -------
    The element name.

    Raises
    ------
    KeyError
        If ``key`` is not an element of that kind, or if it is ``None`` and there is not exactly one
        candidate. The message lists the candidates.
    """
    arg = what or {"images": "image_key", "shapes": "shapes_key", "tables": "table_key"}[kind]
    candidates = list(getattr(sdata, kind).keys())
    if key is not None:
        if key not in candidates:
            raise KeyError(f"{arg}={key!r} is not among the {kind} of this SpatialData: {candidates}.")
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise KeyError(f"This SpatialData has no {kind}; {arg} cannot be inferred.")
    raise KeyError(f"Cannot infer {arg}: this SpatialData has several {kind} {candidates}. Pass {arg}=... .")


# --------------------------------------------------------------------------------------------- pixel size
def set_pixel_size(sdata: SpatialData, image_key: str, um_per_px: float) -> None:
    """Record the physical pixel size of an image's full-resolution level.

    Parameters
    ----------
    sdata
        The SpatialData object holding the image; ``sdata.attrs`` is updated in place.
    image_key
        Name of the image element.
    um_per_px
        Micrometres per pixel of the image's ``scale0`` level (µm/px), > 0.
    """
    resolve_key(sdata, "images", image_key)
    value = float(um_per_px)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Pixel size of image {image_key!r} must be a positive number of µm/px, got {um_per_px!r}.")
    entry = dict(sdata.attrs.get(ATTRS_KEY, {}))
    sizes = dict(entry.get("pixel_size_um", {}))
    sizes[image_key] = value
    entry["pixel_size_um"] = sizes
    sdata.attrs[ATTRS_KEY] = entry


def get_pixel_size(sdata: SpatialData, image_key: str) -> float:
    """Physical pixel size (µm/px) of the full-resolution level of an image.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        Name of the image element.

    Returns
    -------
    Micrometres per pixel of ``scale0``.

    Raises
    ------
    KeyError
        If the image does not exist or no pixel size was recorded for it. Readers of this package
        record it; for other data call :func:`genedml_sd.io.set_pixel_size`.
    """
    resolve_key(sdata, "images", image_key)
    sizes = sdata.attrs.get(ATTRS_KEY, {}).get("pixel_size_um", {})
    if image_key not in sizes:
        raise KeyError(
            f"Image {image_key!r} has no recorded pixel size (µm/px). Record it with "
            f"`gd.io.set_pixel_size(sdata, {image_key!r}, um_per_px)`, or estimate it from the spots with "
            f"`gd.io.estimate_pixel_size(...)`. Known pixel sizes: {dict(sizes)}."
        )
    return float(sizes[image_key])


# --------------------------------------------------------------------------------------------- images
def image_levels(image: xr.DataArray | xr.DataTree) -> list[xr.DataArray]:
    """Pyramid levels of an image element, finest first, each a ``(c, y, x)`` DataArray."""
    import xarray as xr

    if isinstance(image, xr.DataArray):
        return [image]
    levels: list[xr.DataArray] = []
    for name in sorted(image.children, key=lambda s: int(str(s).removeprefix("scale"))):
        node = image[name]
        levels.append(next(iter(node.values())))  # type: ignore[operator, arg-type]  # xarray stubs: DataTree.values
    return levels


def level_downsampling(levels: list[xr.DataArray]) -> np.ndarray:
    """Downsampling factor ``(sy, sx)`` of each level relative to ``scale0``, shape (n_levels, 2).

    Computed from the level sizes (pyramid levels are not exact halves for odd sizes).
    """
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    return np.array([(h0 / lv.sizes["y"], w0 / lv.sizes["x"]) for lv in levels], dtype=np.float64)


# --------------------------------------------------------------------------------------------- geometry
def shared_coordinate_system(sdata: SpatialData, *keys: str, coordinate_system: str | None = None) -> str:
    """A coordinate system in which all given elements are defined.

    ``coordinate_system`` is checked and returned when given (an error names the systems the elements do
    share); otherwise ``"global"`` when shared, else the first shared system in sorted order.
    """
    from spatialdata.transformations import get_transformation

    common = None
    for key in keys:
        systems = set(get_transformation(sdata[key], get_all=True).keys())
        common = systems if common is None else common & systems
    if not common:
        raise ValueError(f"Elements {list(keys)} share no coordinate system; cannot relate spots to image pixels.")
    if coordinate_system is not None:
        if coordinate_system not in common:
            raise ValueError(
                f"coordinate_system={coordinate_system!r} is not shared by {list(keys)}; they share {sorted(common)}."
            )
        return coordinate_system
    return "global" if "global" in common else sorted(common)[0]


def affine_to_pixels(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Affine matrix (3x3) mapping shapes coordinates ``(x, y, 1)`` to pixels of one image level.

    The map goes through a coordinate system shared by both elements, so any stored
    transformation (scale, translation, rotation) is honoured.
    """
    from spatialdata.transformations import Sequence as TransformSequence
    from spatialdata.transformations import get_transformation

    cs = shared_coordinate_system(sdata, shapes_key, image_key)
    level_da = image_levels(sdata[image_key])[level]
    to_cs = get_transformation(sdata[shapes_key], to_coordinate_system=cs)
    # For multiscale images, each level's DataArray carries its own transform to each system.
    if level_da.attrs.get("transform") and cs in level_da.attrs["transform"]:
        level_to_cs = level_da.attrs["transform"][cs]
    else:
        level_to_cs = get_transformation(sdata[image_key], to_coordinate_system=cs)
    seq = TransformSequence([to_cs, level_to_cs.inverse()])
    return np.asarray(seq.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


OBSERVATION_GEOMETRIES = ("Point", "Polygon", "MultiPolygon")
"""Geometry types of observations: circles (points with a ``radius``), squares / bins and cell polygons."""


def observation_centres(shapes: gpd.GeoDataFrame) -> np.ndarray:
    """Centres of observations in the element's own coordinates, (n_obs, 2) as ``(x, y)``.

    Circles: their centre point. Squares, bins and cells (polygons): their centroid.
    """
    geom = shapes.geometry
    if (geom.geom_type == "Point").all():
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
    import shapely

    c = shapely.centroid(geom.to_numpy())
    return np.column_stack([shapely.get_x(c), shapely.get_y(c)]).astype(np.float64)


def observation_radii(shapes: gpd.GeoDataFrame) -> np.ndarray:
    """Radius of each observation in the element's own units, (n_obs,).

    Circles: their ``radius``. Polygons: the radius of the circle of equal area, ``sqrt(area / pi)``
    (a square bin of side ``s`` has ``s / sqrt(pi)``).
    """
    if "radius" in shapes.columns and (shapes.geometry.geom_type == "Point").all():
        return shapes["radius"].to_numpy(dtype=np.float64)
    return np.sqrt(shapes.geometry.area.to_numpy(dtype=np.float64) / math.pi)


def spots_to_pixels(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Observation centres in the pixel frame of an image level, shape (n_obs, 2) as ``(x, y)`` = (col, row).

    Centres of circles, centroids of squares and polygons (see :func:`observation_centres`). Pixel
    coordinates are continuous: pixel ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``.
    """
    xy = observation_centres(sdata[shapes_key])
    m = affine_to_pixels(sdata, shapes_key, image_key, level)
    return xy @ m[:2, :2].T + m[:2, 2]


def spot_radius_px(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Observation radii in pixels of an image level, shape (n_obs,) (equal-area radius for polygons)."""
    m = affine_to_pixels(sdata, shapes_key, image_key, level)
    return observation_radii(sdata[shapes_key]) * math.sqrt(abs(np.linalg.det(m[:2, :2])))


def is_observation_element(shapes: gpd.GeoDataFrame) -> bool:
    """Whether a shapes element can hold observations: circles (points + ``radius``) or polygons."""
    types = set(shapes.geometry.geom_type.unique())
    if not types or not types <= set(OBSERVATION_GEOMETRIES):
        return False
    return "Point" not in types or (types == {"Point"} and "radius" in shapes.columns)


def check_observations(shapes: gpd.GeoDataFrame, shapes_key: str) -> None:
    """Raise a ``ValueError`` naming the element unless it holds circles or polygons (squares, bins, cells)."""
    if not is_observation_element(shapes):
        geom_types = sorted(set(shapes.geometry.geom_type.unique()))
        raise ValueError(
            f"Shapes element {shapes_key!r} must hold observations: circles (Point geometries with a 'radius' "
            f"column) or polygons (squares, bins, cells); found geometry types {geom_types} and columns "
            f"{list(shapes.columns)}."
        )


# --------------------------------------------------------------------------------------------- tables
def table_regions(table: AnnData) -> list[str]:
    """The elements a table annotates (``spatialdata_attrs["region"]``, a str or a list), as a list."""
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    if region is None:
        return []
    return [str(region)] if isinstance(region, str) else [str(r) for r in region]


def is_prediction_table(table: AnnData) -> bool:
    """Whether a table holds predictions written by :func:`genedml_sd.tl.predict` (never counts to train on)."""
    info = table.uns.get(ATTRS_KEY, {})
    return isinstance(info, Mapping) and (info.get("kind") == PREDICTIONS_KIND or "method" in info)


def feature_table_source(table: AnnData) -> str | None:
    """Which tool wrote a table of tile embeddings: ``"sopa"``, ``"lazyslide"``, or ``None`` (not one).

    sopa's ``compute_embeddings`` records ``uns["embedding_config"]``; wsidata's ``add_features`` (used by
    LazySlide's ``feature_extraction``) links rows to tiles by ``obs["tile_id"]``, region key ``library_id``.
    """
    if isinstance(table.uns.get("embedding_config"), Mapping):
        return "sopa"
    attrs = table.uns.get("spatialdata_attrs", {})
    if attrs.get("instance_key") == "tile_id" and attrs.get("region_key") == "library_id":
        return "lazyslide"
    return None


def tables_annotating(
    sdata: SpatialData, shapes_key: str, *, predictions: bool = False, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the tables annotating ``shapes_key``; prediction tables only with ``predictions=True``.

    Tables of tile embeddings written by sopa or LazySlide (:func:`feature_table_source`) are never counts.
    """
    return [
        name
        for name, table in sdata.tables.items()
        if name not in exclude
        and shapes_key in table_regions(table)
        and (predictions or not is_prediction_table(table))
        and feature_table_source(table) is None
    ]


def table_annotating(
    sdata: SpatialData, shapes_key: str, table_key: str | None = None, *, exclude: Sequence[str] = ()
) -> str:
    """Name of the counts table annotating ``shapes_key``; inferred when ``table_key`` is ``None``.

    Tables written by :func:`genedml_sd.tl.predict` are never inferred as counts (and a named one is an
    error): nothing trains or is scored on predictions.
    """
    if table_key is not None:
        resolve_key(sdata, "tables", table_key)
        table = sdata.tables[table_key]
        regions = table_regions(table)
        if shapes_key not in regions:
            raise ValueError(
                f"Table {table_key!r} annotates {regions}, not the shapes element {shapes_key!r}. "
                f"Link it with `sdata.set_table_annotates_spatialelement({table_key!r}, {shapes_key!r})`."
            )
        if is_prediction_table(table):
            raise ValueError(
                f"Table {table_key!r} holds predictions written by gd.tl.predict, not measured counts; "
                "pass the counts table as table_key."
            )
        return table_key
    candidates = tables_annotating(sdata, shapes_key, exclude=exclude)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        skipped = tables_annotating(sdata, shapes_key, predictions=True, exclude=exclude)
        note = f" ({skipped} hold predictions of gd.tl.predict and are never used as counts)" if skipped else ""
        raise KeyError(
            f"No counts table annotates the shapes element {shapes_key!r}{note}; tables: {list(sdata.tables)}."
        )
    raise KeyError(f"Several counts tables annotate {shapes_key!r}: {candidates}. Pass table_key=... .")


def infer_shapes_key(sdata: SpatialData, shapes_key: str | None, table_key: str | None) -> str:
    """The observations element: ``shapes_key``, or inferred from the table's region or the only candidate.

    With ``table_key`` given, the element it annotates; otherwise the only element of circles or polygons;
    with several, the only one annotated by a counts table (prediction tables do not count).
    """
    if shapes_key is not None:
        return resolve_key(sdata, "shapes", shapes_key)
    if table_key is not None:
        regions = [r for r in table_regions(sdata.tables[resolve_key(sdata, "tables", table_key)]) if r in sdata.shapes]
        if len(regions) == 1:
            return regions[0]
    candidates = [k for k, v in sdata.shapes.items() if is_observation_element(v)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        annotated = [k for k in candidates if tables_annotating(sdata, k)]
        if len(annotated) == 1:
            return annotated[0]
    return resolve_key(sdata, "shapes", None)


def prediction_region(sdata: SpatialData, pred_key: str) -> str:
    """The shapes element a prediction table annotates (an error names ``pred_key`` if there is none)."""
    resolve_key(sdata, "tables", pred_key, what="pred_key")
    regions = [r for r in table_regions(sdata.tables[pred_key]) if r in sdata.shapes]
    if not regions:
        raise ValueError(f"Prediction table {pred_key!r} does not annotate a shapes element of this SpatialData.")
    return regions[0]


@dataclass(frozen=True)
class AlignedTables:
    """A prediction table and the counts table of the same observations, aligned row by row.

    Attributes
    ----------
    shapes_key
        The observations element both tables annotate.
    pred_key, table_key
        Names of the prediction and the counts table.
    pred_rows, obs_rows
        Row positions in each table of every observation of ``shapes_key``, in shapes order, (n_obs,).
    """

    shapes_key: str
    pred_key: str
    table_key: str
    pred_rows: np.ndarray
    obs_rows: np.ndarray


def aligned_tables(sdata: SpatialData, pred_key: str, table_key: str | None = None) -> AlignedTables:
    """Match a prediction table with the counts table of the same spots (inferred when ``table_key`` is ``None``)."""
    shapes_key = prediction_region(sdata, pred_key)
    table_key = table_annotating(sdata, shapes_key, table_key, exclude=[pred_key])
    shapes = sdata[shapes_key]
    pred_rows = table_rows_for_shapes(sdata.tables[pred_key], shapes, shapes_key, pred_key)
    obs_rows = table_rows_for_shapes(sdata.tables[table_key], shapes, shapes_key, table_key)
    return AlignedTables(shapes_key, pred_key, table_key, pred_rows, obs_rows)


def table_rows_for_shapes(table: AnnData, shapes: gpd.GeoDataFrame, shapes_key: str, table_key: str) -> np.ndarray:
    """Positions of table rows matching each spot of ``shapes`` (in shapes order), shape (n_spots,).

    Raises a ``ValueError`` naming both elements if some spots have no row in the table.
    """
    import pandas as pd
    from spatialdata.models import get_table_keys

    _, region_key, instance_key = get_table_keys(table)
    rows = np.flatnonzero((table.obs[region_key].astype(str) == shapes_key).to_numpy())
    ids = pd.Index(table.obs[instance_key].to_numpy()[rows].astype(str))
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Table {table_key!r} has several rows for the same instance of {shapes_key!r} (e.g. {dup}).")
    spot_ids = pd.Index(shapes.index.astype(str))
    pos = ids.get_indexer(spot_ids)
    if (pos < 0).any():
        missing = spot_ids[pos < 0]
        raise ValueError(
            f"Table {table_key!r} has no row for {len(missing)} of the {len(spot_ids)} spots of {shapes_key!r} "
            f"(e.g. {missing[:5].tolist()}); a table must annotate every spot used for training or evaluation."
        )
    return rows[pos].astype(np.int64)


def get_sample_info(table: AnnData) -> Mapping[str, object]:
    """Sample metadata of this package stored in ``table.uns`` (patient, section, ...), possibly empty."""
    return dict(table.uns.get(ATTRS_KEY, {}))


def sample_info(sdata: SpatialData, shapes_key: str, table_key: str | None, *, exclude: Sequence[str] = ()) -> dict:
    """Sample metadata (patient, section, ...) of the observations ``shapes_key``, with fallbacks.

    Read from ``table_key`` (or, when ``None``, from the first counts table annotating the element): the
    package's entry in ``table.uns``, then single-valued ``patient`` / ``section`` / ``sample`` columns of
    ``obs``; ``section`` defaults to ``shapes_key`` and ``patient`` to the section.
    """
    if table_key is None:
        found = tables_annotating(sdata, shapes_key, exclude=exclude)
        table_key = found[0] if found else None
    info: dict[str, object] = {}
    if table_key is not None:
        table = sdata.tables[table_key]
        info.update(get_sample_info(table))
        for col in ("patient", "section", "sample"):
            if col not in info and col in table.obs and table.obs[col].nunique() == 1:
                info[col] = str(table.obs[col].iloc[0])
    info.setdefault("section", shapes_key)
    info.setdefault("patient", info["section"])
    return info
