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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

ATTRS_KEY = "genedml_sd"
"""Key of this package's entry in ``sdata.attrs`` and in ``table.uns``."""

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
    levels = []
    for name in sorted(image.children, key=lambda s: int(s.removeprefix("scale"))):
        node = image[name]
        levels.append(next(iter(node.values())))
    return levels


def level_downsampling(levels: list[xr.DataArray]) -> np.ndarray:
    """Downsampling factor ``(sy, sx)`` of each level relative to ``scale0``, shape (n_levels, 2).

    Computed from the level sizes (pyramid levels are not exact halves for odd sizes).
    """
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    return np.array([(h0 / lv.sizes["y"], w0 / lv.sizes["x"]) for lv in levels], dtype=np.float64)


# --------------------------------------------------------------------------------------------- geometry
def shared_coordinate_system(sdata: SpatialData, *keys: str) -> str:
    """A coordinate system in which all given elements are defined (``"global"`` preferred)."""
    from spatialdata.transformations import get_transformation

    common = None
    for key in keys:
        systems = set(get_transformation(sdata[key], get_all=True).keys())
        common = systems if common is None else common & systems
    if not common:
        raise ValueError(f"Elements {list(keys)} share no coordinate system; cannot relate spots to image pixels.")
    return "global" if "global" in common else sorted(common)[0]


def affine_to_pixels(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Affine matrix (3x3) mapping shapes coordinates ``(x, y, 1)`` to pixels of one image level.

    The map goes through a coordinate system shared by both elements, so any stored
    transformation (scale, translation, rotation) is honoured.
    """
    from spatialdata.transformations import Sequence, get_transformation

    cs = shared_coordinate_system(sdata, shapes_key, image_key)
    level_da = image_levels(sdata[image_key])[level]
    to_cs = get_transformation(sdata[shapes_key], to_coordinate_system=cs)
    # For multiscale images, each level's DataArray carries its own transform to each system.
    if level_da.attrs.get("transform") and cs in level_da.attrs["transform"]:
        level_to_cs = level_da.attrs["transform"][cs]
    else:
        level_to_cs = get_transformation(sdata[image_key], to_coordinate_system=cs)
    seq = Sequence([to_cs, level_to_cs.inverse()])
    return np.asarray(seq.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def spots_to_pixels(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Spot centres in the pixel frame of an image level, shape (n_spots, 2) as ``(x, y)`` = (col, row).

    Pixel coordinates are continuous: pixel ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``.
    """
    shapes = sdata[shapes_key]
    xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    m = affine_to_pixels(sdata, shapes_key, image_key, level)
    return xy @ m[:2, :2].T + m[:2, 2]


def spot_radius_px(sdata: SpatialData, shapes_key: str, image_key: str, level: int = 0) -> np.ndarray:
    """Spot radii in pixels of an image level, shape (n_spots,)."""
    m = affine_to_pixels(sdata, shapes_key, image_key, level)
    return sdata[shapes_key]["radius"].to_numpy(dtype=np.float64) * math.sqrt(abs(np.linalg.det(m[:2, :2])))


def check_circles(shapes: gpd.GeoDataFrame, shapes_key: str) -> None:
    """Raise a ``ValueError`` naming the element if ``shapes`` are not circles (points + ``radius``)."""
    geom_types = set(shapes.geometry.geom_type.unique())
    if geom_types != {"Point"} or "radius" not in shapes.columns:
        raise ValueError(
            f"Shapes element {shapes_key!r} must hold circles (Point geometries with a 'radius' column); "
            f"found geometry types {sorted(geom_types)} and columns {list(shapes.columns)}."
        )


# --------------------------------------------------------------------------------------------- tables
def table_annotating(sdata: SpatialData, shapes_key: str, table_key: str | None = None) -> str:
    """Name of the table annotating ``shapes_key``; infer it when ``table_key`` is ``None``."""
    from spatialdata.models import get_table_keys

    if table_key is not None:
        resolve_key(sdata, "tables", table_key)
        region, _, _ = get_table_keys(sdata.tables[table_key])
        regions = [region] if isinstance(region, str) else list(region)
        if shapes_key not in regions:
            raise ValueError(
                f"Table {table_key!r} annotates {regions}, not the shapes element {shapes_key!r}. "
                f"Link it with `sdata.set_table_annotates_spatialelement({table_key!r}, {shapes_key!r})`."
            )
        return table_key
    candidates = []
    for name, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs", {})
        region = attrs.get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if shapes_key in regions:
            candidates.append(name)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise KeyError(f"No table annotates the shapes element {shapes_key!r}; tables: {list(sdata.tables)}.")
    raise KeyError(f"Several tables annotate {shapes_key!r}: {candidates}. Pass table_key=... .")


def table_rows_for_shapes(table: AnnData, shapes: gpd.GeoDataFrame, shapes_key: str, table_key: str) -> np.ndarray:
    """Positions of table rows matching each spot of ``shapes`` (in shapes order), shape (n_spots,).

    Raises a ``ValueError`` naming both elements if some spots have no row in the table.
    """
    from spatialdata.models import get_table_keys

    _, region_key, instance_key = get_table_keys(table)
    rows = np.flatnonzero((table.obs[region_key].astype(str) == shapes_key).to_numpy())
    ids = table.obs[instance_key].to_numpy()[rows]
    lookup = {str(v): i for v, i in zip(ids, rows, strict=True)}
    spot_ids = [str(v) for v in shapes.index]
    missing = [s for s in spot_ids if s not in lookup]
    if missing:
        raise ValueError(
            f"Table {table_key!r} has no row for {len(missing)} of the {len(spot_ids)} spots of {shapes_key!r} "
            f"(e.g. {missing[:5]}); a table must annotate every spot used for training or evaluation."
        )
    return np.array([lookup[s] for s in spot_ids], dtype=np.int64)


def get_sample_info(table: AnnData) -> Mapping[str, object]:
    """Sample metadata of this package stored in ``table.uns`` (patient, section, ...), possibly empty."""
    return dict(table.uns.get(ATTRS_KEY, {}))
