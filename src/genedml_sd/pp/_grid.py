"""Regular grids of spots or square bins over H&E images.

:func:`spot_grid` lays a regular square or hexagonal lattice of circular spots, or a square lattice of
square bins (µm spacing and size), over the tissue of an image and stores it as a shapes element:
circles (points with a ``radius`` column) or square polygons like the bins of Visium HD, which
:class:`genedml_sd.tiling.SpotTiler` reads like measured spots, so that expression can be predicted
on images without spatial transcriptomics.

Geometry conventions: pixel ``i`` of a level covers ``[i, i + 1)`` in continuous pixel coordinates;
lattices are laid out in full-resolution (``scale0``) pixels of the image, which are square with
the recorded pixel size (µm/px), and then mapped through the image's own transformations (see
:mod:`genedml_sd.pp._shapes`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genedml_sd._spatial import get_pixel_size, image_levels, resolve_key

from ._shapes import check_new_key, image_frame, square_polygons
from ._tissue import tissue_mask

if TYPE_CHECKING:
    from collections.abc import Mapping

    import geopandas as gpd
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- helpers
def _lattice(width: float, height: float, spacing: float, radius: float, lattice: str) -> np.ndarray:
    """Lattice points ``(x, y)`` with whole circles inside ``[0, width] x [0, height]``, centred, row-major."""
    span_x, span_y = width - 2 * radius, height - 2 * radius
    if span_x < 0 or span_y < 0:
        return np.zeros((0, 2))
    row_step = spacing * math.sqrt(3) / 2 if lattice == "hex" else spacing
    nx = int(math.floor(span_x / spacing + 1e-9)) + 1
    ny = int(math.floor(span_y / row_step + 1e-9)) + 1
    x0 = radius + (span_x - (nx - 1) * spacing) / 2
    y0 = radius + (span_y - (ny - 1) * row_step) / 2
    ys = y0 + row_step * np.arange(ny)
    xs = x0 + spacing * np.arange(nx)
    gx, gy = np.meshgrid(xs, ys)
    if lattice == "hex":
        gx = gx + (np.arange(ny)[:, None] % 2) * spacing / 2
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    return pts[pts[:, 0] <= width - radius + 1e-9]


def _mask_values(mask_el: Any, mask_name: str, image: Any, image_key: str, xy0: np.ndarray) -> np.ndarray:
    """Mask values at scale0 pixel positions ``xy0`` of the image (0 outside the mask)."""
    from spatialdata.transformations import Sequence, get_transformation

    img_cs = get_transformation(image, get_all=True)
    mask_cs = get_transformation(mask_el, get_all=True)
    common = set(img_cs) & set(mask_cs)
    if not common:
        raise ValueError(
            f"Mask {mask_name!r} (coordinate systems {sorted(mask_cs)}) and image {image_key!r} "
            f"(coordinate systems {sorted(img_cs)}) share no coordinate system."
        )
    cs = "global" if "global" in common else sorted(common)[0]
    m = np.asarray(
        Sequence([img_cs[cs], mask_cs[cs].inverse()]).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
        dtype=np.float64,
    )
    level = image_levels(mask_el)[0]
    if "c" in level.dims:
        level = level.isel(c=0)
    h, w = level.sizes["y"], level.sizes["x"]
    q = np.floor(xy0 @ m[:2, :2].T + m[:2, 2]).astype(np.int64)
    inside = (q[:, 0] >= 0) & (q[:, 0] < w) & (q[:, 1] >= 0) & (q[:, 1] < h)
    values = np.zeros(len(xy0), dtype=np.int64)
    if inside.any():
        data = level.transpose("y", "x").data
        iy, ix = q[inside, 1], q[inside, 0]
        if hasattr(data, "vindex"):
            picked = np.asarray(data.vindex[iy, ix].compute())
        else:
            picked = np.asarray(data)[iy, ix]
        values[inside] = picked.astype(np.int64)
    return values


def _resolve_mask(
    sdata: SpatialData, image_key: str, mask: str | xr.DataArray, mask_kwargs: Mapping[str, Any] | None
) -> tuple[Any, str]:
    """The mask element and its name for messages: computed (``"auto"``), given, or a labels element."""
    import xarray as xr

    if isinstance(mask, xr.DataArray | xr.DataTree):
        return mask, "the given mask"
    if mask == "auto":
        kwargs = dict(mask_kwargs or {})
        if kwargs.get("inplace", False):
            tissue_mask(sdata, image_key, **kwargs)
            name = kwargs.get("key_added") or f"{image_key}_tissue"
            return sdata.labels[name], name
        kwargs["inplace"] = False
        return tissue_mask(sdata, image_key, **kwargs), "auto"
    if mask not in sdata.labels:
        raise KeyError(f"mask={mask!r} is not among the labels of this SpatialData: {list(sdata.labels)}.")
    return sdata.labels[mask], mask


def _grid_geometry(
    shape: str, spacing_um: float | None, diameter_um: float, size_um: float | None, lattice: str | None
) -> tuple[float, float, str]:
    """Checked ``(spacing_um, extent_um, lattice)``: extent is the circle diameter or the square side."""
    if shape not in ("circle", "square"):
        raise ValueError(f"shape must be 'circle' or 'square', got {shape!r}.")
    if shape == "circle":
        if size_um is not None:
            raise ValueError(
                f"size_um={size_um!r} is the side of square bins; circles take diameter_um (or pass shape='square')."
            )
        extent, what = diameter_um, "diameter_um"
        spacing = 100.0 if spacing_um is None else spacing_um
        lattice = "hex" if lattice is None else lattice
    else:
        if size_um is None:
            raise ValueError("shape='square' needs size_um, the side of the square bins in µm (e.g. 8, 16 or 56).")
        extent, what = size_um, "size_um"
        spacing = size_um if spacing_um is None else spacing_um
        lattice = "square" if lattice is None else lattice
        if lattice != "square":
            raise ValueError(f"Square bins lie on a square lattice; got lattice={lattice!r}.")
    for name, value in (("spacing_um", spacing), (what, extent)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of µm, got {value!r}.")
    if spacing < extent:
        raise ValueError(
            f"spacing_um={spacing:g} is smaller than {what}={extent:g}: neighbouring "
            f"{'spots' if shape == 'circle' else 'bins'} would overlap."
        )
    if lattice not in ("hex", "square"):
        raise ValueError(f"lattice must be 'hex' or 'square', got {lattice!r}.")
    return float(spacing), float(extent), lattice


def spot_grid(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    spacing_um: float | None = None,
    diameter_um: float = 55.0,
    lattice: Literal["hex", "square"] | None = None,
    shape: Literal["circle", "square"] = "circle",
    size_um: float | None = None,
    mask: str | xr.DataArray | None = "auto",
    mask_kwargs: Mapping[str, Any] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> gpd.GeoDataFrame | None:
    """Regular grid of circular spots or square bins over the tissue of an image.

    Spots are laid on a square or hexagonal lattice of full-resolution image pixels (so distances are
    exact in µm), centred on the image, each spot lying entirely inside the image; spots whose centre
    falls outside the tissue mask are dropped. Geometries are stored in the image's coordinate system
    (``"global"`` when the image has it) and reach its other coordinate systems through
    transformations, so the grid lines up with the image in plots. Both can be read by
    :class:`genedml_sd.tiling.SpotTiler` and :func:`genedml_sd.tl.predict` like measured spots;
    squares are polygons like the bins of Visium HD (e.g. ``shape="square", size_um=8``), and bins
    with counts can be summed into larger pseudo-spots with :func:`genedml_sd.pp.aggregate_bins`.

    Parameters
    ----------
    sdata
        SpatialData with the image; its pixel size (µm/px) must be recorded. Nothing in it is
        modified except adding the grid (and the mask, if ``mask_kwargs`` asks for it).
    image_key
        Image element (single-scale or multiscale); inferred when there is only one.
    spacing_um
        Centre-to-centre distance of neighbouring spots or bins, µm. Default 100 for circles (Visium;
        200 for legacy ST) and ``size_um`` for squares (bins tile the tissue without gaps).
    diameter_um
        Circle diameter, µm (100 for legacy ST, 55 for Visium); at most ``spacing_um``. Circles only.
    lattice
        ``"hex"`` (rows offset by half a spacing, 0.866 spacing apart, like Visium) or ``"square"``.
        Default ``"hex"`` for circles; squares always lie on a square lattice.
    shape
        ``"circle"`` (points with a ``radius`` column) or ``"square"`` (axis-aligned square polygons
        in the image's pixel frame).
    size_um
        Side of the square bins, µm (e.g. 2, 8 or 16 for Visium HD, 56 or 112 for pseudo-spots); at
        most ``spacing_um``. Squares only.
    mask
        ``"auto"`` computes :func:`tissue_mask` (not stored unless ``mask_kwargs`` has
        ``inplace=True``); the name of a labels element (or a labels DataArray) uses that mask, where
        any non-zero value is tissue; ``None`` covers the whole image.
    mask_kwargs
        Keyword arguments for :func:`tissue_mask` when ``mask="auto"``.
    key_added
        Name of the new shapes element; default ``f"{image_key}_grid"`` for circles and
        ``f"{image_key}_bins_{size_um:g}um"`` for squares.
    overwrite
        Replace an existing shapes element named ``key_added``; otherwise that is a ``KeyError``.
    inplace
        Add the grid to ``sdata.shapes`` and return ``None``; with ``False`` return it only.

    Returns
    -------
    ``None``, or with ``inplace=False`` the grid, index ``0..n-1`` in row-major order: circles
    (GeoDataFrame of points with a ``radius`` column, in units of the coordinate system), or squares
    (polygons with a ``side_um`` column holding the side in µm; the side in units of the coordinate
    system is ``side_um / um_per_px`` times the image's scale).

    Raises
    ------
    ValueError
        If ``spacing_um`` is smaller than ``diameter_um`` or ``size_um`` (neighbours would overlap),
        if ``shape`` and ``size_um`` / ``lattice`` do not fit, if no spot falls on tissue, or if the
        mask and the image share no coordinate system.
    KeyError
        If ``key_added`` exists and ``overwrite`` is ``False``, or ``mask`` names no labels element.

    Examples
    --------
    Visium HD-like 8 µm bins over the tissue of a demo section:

    >>> import genedml_sd as gd
    >>> (b4,) = gd.datasets.her2st_demo(["B4"])
    >>> gd.pp.spot_grid(b4, "B4_he", shape="square", size_um=8)
    >>> float(b4["B4_he_bins_8um"]["side_um"].iloc[0])
    8.0
    """
    import pandas as pd
    from spatialdata.models import ShapesModel

    image_key = resolve_key(sdata, "images", image_key)
    spacing_um, extent_um, lattice_kind = _grid_geometry(shape, spacing_um, diameter_um, size_um, lattice)
    key_added = key_added or (f"{image_key}_grid" if shape == "circle" else f"{image_key}_bins_{extent_um:g}um")
    if inplace:
        check_new_key(sdata, key_added, "shapes", overwrite)

    image = sdata[image_key]
    levels = image_levels(image)
    um0 = get_pixel_size(sdata, image_key)
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    spacing_px, half_px = spacing_um / um0, extent_um / 2 / um0
    xy0 = _lattice(w0, h0, spacing_px, half_px, lattice_kind)
    if not len(xy0):
        what = "spot" if shape == "circle" else "bin"
        raise ValueError(
            f"Image {image_key!r} ({w0 * um0:.0f} x {h0 * um0:.0f} µm) is too small for a {what} of {extent_um:g} µm."
        )

    if mask is not None:
        mask_el, mask_name = _resolve_mask(sdata, image_key, mask, mask_kwargs)
        on_tissue = _mask_values(mask_el, mask_name, image, image_key, xy0) != 0
        if not on_tissue.any():
            raise ValueError(
                f"No grid spot of image {image_key!r} falls on tissue of mask {mask_name!r} (no tissue at "
                f"{spacing_um:g} µm spacing)."
            )
        xy0 = xy0[on_tissue]

    cs, a, shape_tf = image_frame(image)
    n = len(xy0)
    if shape == "circle":
        centres = xy0 @ a[:2, :2].T + a[:2, 2]
        radius_cs = half_px * math.sqrt(abs(float(np.linalg.det(a[:2, :2]))))
        grid = ShapesModel.parse(
            centres, geometry=0, radius=np.full(n, radius_cs), index=pd.RangeIndex(n), transformations=shape_tf
        )
    else:
        import geopandas as gpd

        polygons = square_polygons(xy0 - half_px, 2 * half_px, a)
        frame = gpd.GeoDataFrame({"side_um": np.full(n, extent_um)}, geometry=polygons, index=pd.RangeIndex(n))
        grid = ShapesModel.parse(frame, transformations=shape_tf)
    logger.info(
        "Spot grid over %s: %d %s %ss, %g µm spacing, %g µm %s, mask %s",
        image_key,
        n,
        lattice_kind,
        shape,
        spacing_um,
        extent_um,
        "diameter" if shape == "circle" else "side",
        "none" if mask is None else (mask if isinstance(mask, str) else "given"),
    )
    if not inplace:
        return grid
    sdata.shapes[key_added] = grid
    return None
