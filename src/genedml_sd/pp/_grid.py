"""Tissue masks and regular spot grids over H&E images.

:func:`tissue_mask` separates tissue from glass on a coarse pyramid level (never the full-resolution
image) and stores it as a labels element aligned with the image. :func:`spot_grid` lays a regular
square or hexagonal lattice of circular spots (µm spacing and diameter) over the tissue and stores
it as a circles shapes element that :class:`genedml_sd.tiling.SpotTiler` reads like measured spots,
so that expression can be predicted on images without spatial transcriptomics.

Geometry conventions: pixel ``i`` of a level covers ``[i, i + 1)`` in continuous pixel coordinates;
lattices are laid out in full-resolution (``scale0``) pixels of the image, which are square with
the recorded pixel size (µm/px), and then mapped through the image's own transformations.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genedml_sd._spatial import get_pixel_size, image_levels, level_downsampling, resolve_key

if TYPE_CHECKING:
    from collections.abc import Mapping

    import geopandas as gpd
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

MIN_TISSUE_OD = 0.05
"""Lowest optical density (darkest channel, log10) ever called tissue; blank glass is about 0-0.03."""

SMOOTH_UM = 32.0
"""Gaussian smoothing (µm) of the optical density before estimating the threshold."""

CLOSING_UM = 40.0
"""Radius (µm) of the binary closing that joins the gaps of loose tissue (stroma, fat)."""

_LOG_EPS = 0.01
"""Offset of the log transform used by the Otsu threshold (optical density units)."""


# --------------------------------------------------------------------------------------------- helpers
def _check_new_key(sdata: SpatialData, key: str, kind: str, overwrite: bool) -> None:
    """Raise a ``KeyError`` if ``key`` names an element that must not be replaced."""
    if key not in sdata:
        return
    if not overwrite:
        raise KeyError(f"Element {key!r} already exists; pass overwrite=True to replace it, or another key_added.")
    if key not in getattr(sdata, kind):
        raise KeyError(f"Element {key!r} exists and is not a {kind} element; choose another key_added.")


def _level_um_per_px(sdata: SpatialData, image_key: str, levels: list[xr.DataArray]) -> np.ndarray:
    """µm/px ``(y, x)`` of each pyramid level, shape (n_levels, 2)."""
    return get_pixel_size(sdata, image_key) * level_downsampling(levels)


def _brightfield_channels(arr: np.ndarray, image_key: str) -> np.ndarray:
    """RGB channels (or the single grey channel) of a channels-first array, (3 or 1, h, w)."""
    n_c = arr.shape[0]
    if n_c in (3, 4):
        arr = arr[:3]
    elif n_c != 1:
        raise ValueError(
            f"Image {image_key!r} has {n_c} channels; tissue detection needs a brightfield RGB(A) or grey image."
        )
    return arr


def _optical_density(arr: np.ndarray, max_value: float) -> np.ndarray:
    """Optical density (log10) of the darkest channel, (h, w); glass is ~0, stained tissue > 0.1."""
    darkest = np.clip(arr.min(axis=0) / max_value, 1.0 / 255.0, 1.0)
    return -np.log10(darkest)


def _pad_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk, padded so that tissue touching the border is kept."""
    from scipy import ndimage
    from skimage.morphology import disk

    if radius < 1:
        return mask
    pad = radius + 1
    padded = np.pad(mask, pad, constant_values=False)
    closed = ndimage.binary_closing(padded, structure=disk(radius).astype(bool))
    return closed[pad:-pad, pad:-pad]


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected foreground components with fewer than ``min_px`` pixels."""
    from scipy import ndimage

    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill 4-connected background components enclosed by tissue with fewer than ``max_px`` pixels."""
    from scipy import ndimage

    if max_px <= 0 or mask.all():
        return mask
    lab, n = ndimage.label(~mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[lab]


def _threshold(od: np.ndarray, method: str | float, sigma_px: float) -> float:
    """Optical-density threshold separating tissue from glass."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu, threshold_triangle

    if not isinstance(method, str):
        value = float(method)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"A fixed tissue threshold must be a positive optical density, got {method!r}.")
        return value
    smooth = ndimage.gaussian_filter(od, sigma_px) if sigma_px > 0 else od
    if float(np.ptp(smooth)) < 1e-6:
        return math.inf
    if method == "otsu":
        # Otsu on log(OD): glass is a narrow peak, tissue spreads from pale stroma to dense nuclei; in
        # linear units Otsu would split dense from pale tissue instead of tissue from glass.
        log_od = np.log(smooth + _LOG_EPS)
        return float(np.exp(threshold_otsu(log_od)) - _LOG_EPS)
    if method == "triangle":
        return float(threshold_triangle(smooth))
    raise ValueError(f"method must be 'otsu', 'triangle' or a positive optical density, got {method!r}.")


def _no_tissue_message(image_key: str, where: str, od: np.ndarray, method: str | float, raw: float, n_px: int) -> str:
    """Why no tissue was found: the measured optical densities, the threshold and what exceeded it."""
    q = np.quantile(od, [0.0, 0.5, 0.99, 1.0]) + 0.0  # no '-0' for white glass
    if not math.isfinite(raw):
        how = f"the image is uniform (no contrast after {SMOOTH_UM:g} µm smoothing), so {method!r} finds no threshold"
    else:
        how = f"the {'fixed' if not isinstance(method, str) else repr(method)} threshold is {raw:.3g}"
        if raw < MIN_TISSUE_OD:
            how += f", raised to the minimal tissue optical density {MIN_TISSUE_OD:g}"
        how += f"; {n_px} px exceed it" + (", all in too small pieces" if n_px else "")
    return (
        f"Found no tissue in image {image_key!r} ({where}): its optical density (darkest channel, log10; glass is "
        f"about 0-0.03) ranges {q[0]:.3g}-{q[3]:.3g} (median {q[1]:.3g}, 99th percentile {q[2]:.3g}) and {how}. "
        "Check the image, or pass a fixed optical-density threshold as method=... or a smaller min_area_um2."
    )


def _mask_transformations(image: Any, scale_xy: tuple[float, float]) -> dict[str, Any]:
    """Transformations of a mask whose pixel is ``scale_xy`` scale0 pixels, in every system of ``image``."""
    from spatialdata.transformations import Scale, Sequence, get_transformation

    to_scale0 = Scale([scale_xy[0], scale_xy[1]], axes=("x", "y"))
    return {cs: Sequence([to_scale0, t]) for cs, t in get_transformation(image, get_all=True).items()}


# --------------------------------------------------------------------------------------------- tissue mask
def tissue_mask(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    level: int | None = None,
    target_um_per_px: float = 16.0,
    method: Literal["otsu", "triangle"] | float = "otsu",
    min_area_um2: float = 50_000.0,
    max_hole_um2: float = 50_000.0,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> xr.DataArray | None:
    """Boolean tissue mask of a brightfield (H&E) image, computed at low resolution.

    The mask is computed from the coarsest pyramid level whose pixel size is at most
    ``target_um_per_px``, block-averaged lazily down to about that pixel size when the level is
    finer (e.g. single-scale images), so the full-resolution image is never loaded. Tissue is where
    the optical density of the darkest channel exceeds a threshold (Otsu on the log optical density
    by default, never below 0.05); gaps narrower than about 80 µm are closed, enclosed holes smaller
    than ``max_hole_um2`` filled and tissue pieces smaller than ``min_area_um2`` removed.

    Parameters
    ----------
    sdata
        SpatialData with the image; the image's pixel size (µm/px) must be recorded (see
        :func:`genedml_sd.io.set_pixel_size`). Nothing in it is modified except adding the mask.
    image_key
        Image element (single-scale or multiscale, RGB); inferred when there is only one.
    level
        Pyramid level to use, without further averaging. By default chosen from ``target_um_per_px``.
    target_um_per_px
        Wanted pixel size of the mask, µm/px.
    method
        ``"otsu"`` (on log optical density), ``"triangle"``, or a fixed optical-density threshold.
    min_area_um2
        Tissue pieces smaller than this area (µm²) are dropped.
    max_hole_um2
        Holes inside tissue smaller than this area (µm²) are filled.
    key_added
        Name of the labels element; default ``f"{image_key}_tissue"``.
    overwrite
        Replace an existing element named ``key_added``; otherwise that is a ``KeyError``.
    inplace
        Add the mask to ``sdata.labels`` and return ``None``; with ``False`` return it only.

    Returns
    -------
    ``None``, or with ``inplace=False`` the mask: a ``(y, x)`` ``uint8`` labels DataArray (1 = tissue,
    0 = background) carrying transformations to every coordinate system of the image (the mask's
    pixel size relative to ``scale0`` composed with the image's own transformation).

    Raises
    ------
    ValueError
        If no tissue is found.
    """
    from spatialdata.models import Labels2DModel

    image_key = resolve_key(sdata, "images", image_key)
    key_added = key_added or f"{image_key}_tissue"
    if inplace:
        _check_new_key(sdata, key_added, "labels", overwrite)
    if isinstance(method, str) and method not in ("otsu", "triangle"):
        raise ValueError(f"method must be 'otsu', 'triangle' or a positive optical density, got {method!r}.")
    if not (math.isfinite(target_um_per_px) and target_um_per_px > 0):
        raise ValueError(f"target_um_per_px must be a positive number of µm/px, got {target_um_per_px!r}.")

    image = sdata[image_key]
    levels = image_levels(image)
    um = _level_um_per_px(sdata, image_key, levels)
    if level is None:
        ok = np.flatnonzero(um.max(axis=1) <= target_um_per_px * (1 + 1e-6))
        k = int(ok.max()) if ok.size else 0
        factor = max(1, int(math.floor(target_um_per_px / float(um[k].max()) + 1e-6)))
    else:
        if not 0 <= level < len(levels):
            raise IndexError(f"Image {image_key!r} has {len(levels)} pyramid levels; level={level} does not exist.")
        k, factor = level, 1
    lv = levels[k]
    if factor > 1:
        lv = lv.coarsen(x=factor, y=factor, boundary="trim").mean()
    arr = np.asarray(lv.transpose("c", "y", "x").values)
    arr = _brightfield_channels(arr, image_key)
    if np.issubdtype(levels[k].dtype, np.integer):
        max_value = float(np.iinfo(levels[k].dtype).max)
    else:
        max_value = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
    od = _optical_density(np.nan_to_num(arr, nan=max_value), max_value)

    ds = level_downsampling(levels)[k] * factor  # scale0 px per mask px, (y, x)
    mask_um = float(np.sqrt(um[0, 0] * um[0, 1]) * np.sqrt(ds[0] * ds[1]))  # µm per mask px
    raw_thr = _threshold(od, method, SMOOTH_UM / mask_um)
    thr = max(raw_thr, MIN_TISSUE_OD)
    mask = od > thr
    n_above = int(mask.sum())
    mask = _pad_closing(mask, int(round(CLOSING_UM / mask_um)))
    mask = _fill_small_holes(mask, max_hole_um2 / mask_um**2)
    mask = _remove_small(mask, min_area_um2 / mask_um**2)
    if not mask.any():
        where = f"level {k}, {mask_um:.3g} µm/px, pieces >= {min_area_um2:g} µm²"
        raise ValueError(_no_tissue_message(image_key, where, od, method, raw_thr, n_above))
    logger.info(
        "Tissue mask of %s from level %d at %.3g µm/px: %.1f%% tissue (OD threshold %.3f)",
        image_key,
        k,
        mask_um,
        100 * mask.mean(),
        thr,
    )
    labels = Labels2DModel.parse(
        mask.astype(np.uint8),
        dims=("y", "x"),
        transformations=_mask_transformations(image, (float(ds[1]), float(ds[0]))),
    )
    if not inplace:
        return labels
    sdata.labels[key_added] = labels
    return None


# --------------------------------------------------------------------------------------------- spot grid
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


def spot_grid(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    spacing_um: float = 100.0,
    diameter_um: float = 55.0,
    lattice: Literal["hex", "square"] = "hex",
    mask: str | xr.DataArray | None = "auto",
    mask_kwargs: Mapping[str, Any] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> gpd.GeoDataFrame | None:
    """Regular grid of circular spots over the tissue of an image.

    Spots are laid on a square or hexagonal lattice of full-resolution image pixels (so distances are
    exact in µm), centred on the image, each spot lying entirely inside the image; spots whose centre
    falls outside the tissue mask are dropped. Centres are stored in the image's coordinate system
    (``"global"`` when the image has it) and in its other coordinate systems through transformations,
    so the grid lines up with the image in plots and can be read by
    :class:`genedml_sd.tiling.SpotTiler` and :func:`genedml_sd.tl.predict` like measured spots.

    Parameters
    ----------
    sdata
        SpatialData with the image; its pixel size (µm/px) must be recorded. Nothing in it is
        modified except adding the grid (and the mask, if ``mask_kwargs`` asks for it).
    image_key
        Image element (single-scale or multiscale); inferred when there is only one.
    spacing_um
        Centre-to-centre distance of neighbouring spots, µm (200 for legacy ST, 100 for Visium).
    diameter_um
        Spot diameter, µm (100 for legacy ST, 55 for Visium); at most ``spacing_um``.
    lattice
        ``"hex"`` (rows offset by half a spacing, 0.866 spacing apart, like Visium) or ``"square"``.
    mask
        ``"auto"`` computes :func:`tissue_mask` (not stored unless ``mask_kwargs`` has
        ``inplace=True``); the name of a labels element (or a labels DataArray) uses that mask, where
        any non-zero value is tissue; ``None`` covers the whole image.
    mask_kwargs
        Keyword arguments for :func:`tissue_mask` when ``mask="auto"``.
    key_added
        Name of the new shapes element; default ``f"{image_key}_grid"``.
    overwrite
        Replace an existing shapes element named ``key_added``; otherwise that is a ``KeyError``.
    inplace
        Add the grid to ``sdata.shapes`` and return ``None``; with ``False`` return it only.

    Returns
    -------
    ``None``, or with ``inplace=False`` the circles (GeoDataFrame of points with a ``radius`` column,
    index ``0..n-1`` in row-major order).

    Raises
    ------
    ValueError
        If ``spacing_um < diameter_um`` (spots would overlap), if no spot falls on tissue, or if the
        mask and the image share no coordinate system.
    KeyError
        If ``key_added`` exists and ``overwrite`` is ``False``, or ``mask`` names no labels element.
    """
    import pandas as pd
    import xarray as xr
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, Sequence, get_transformation

    image_key = resolve_key(sdata, "images", image_key)
    key_added = key_added or f"{image_key}_grid"
    for name, value in (("spacing_um", spacing_um), ("diameter_um", diameter_um)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of µm, got {value!r}.")
    if spacing_um < diameter_um:
        raise ValueError(
            f"spacing_um={spacing_um:g} is smaller than diameter_um={diameter_um:g}: neighbouring spots would overlap."
        )
    if lattice not in ("hex", "square"):
        raise ValueError(f"lattice must be 'hex' or 'square', got {lattice!r}.")
    if inplace:
        _check_new_key(sdata, key_added, "shapes", overwrite)

    image = sdata[image_key]
    levels = image_levels(image)
    um0 = get_pixel_size(sdata, image_key)
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    spacing_px, radius_px = spacing_um / um0, diameter_um / 2 / um0
    xy0 = _lattice(w0, h0, spacing_px, radius_px, lattice)
    if not len(xy0):
        raise ValueError(
            f"Image {image_key!r} ({w0 * um0:.0f} x {h0 * um0:.0f} µm) is too small for a spot of {diameter_um:g} µm."
        )

    if mask is not None:
        if isinstance(mask, xr.DataArray | xr.DataTree):
            mask_el, mask_name = mask, "the given mask"
        elif mask == "auto":
            kwargs = dict(mask_kwargs or {})
            if kwargs.get("inplace", False):
                tissue_mask(sdata, image_key, **kwargs)
                mask_name = kwargs.get("key_added") or f"{image_key}_tissue"
                mask_el = sdata.labels[mask_name]
            else:
                kwargs["inplace"] = False
                mask_el, mask_name = tissue_mask(sdata, image_key, **kwargs), "auto"
        else:
            if mask not in sdata.labels:
                raise KeyError(f"mask={mask!r} is not among the labels of this SpatialData: {list(sdata.labels)}.")
            mask_el, mask_name = sdata.labels[mask], mask
        on_tissue = _mask_values(mask_el, mask_name, image, image_key, xy0) != 0
        if not on_tissue.any():
            raise ValueError(
                f"No grid spot of image {image_key!r} falls on tissue of mask {mask_name!r} (no tissue at "
                f"{spacing_um:g} µm spacing)."
            )
        xy0 = xy0[on_tissue]

    transforms = get_transformation(image, get_all=True)
    cs = "global" if "global" in transforms else sorted(transforms)[0]
    to_cs = transforms[cs]
    a = np.asarray(to_cs.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    centres = xy0 @ a[:2, :2].T + a[:2, 2]
    radius_cs = radius_px * math.sqrt(abs(float(np.linalg.det(a[:2, :2]))))
    shape_tf: dict[str, Any] = {cs: Identity()}
    for other, t in transforms.items():
        if other != cs:
            shape_tf[other] = Sequence([to_cs.inverse(), t])
    n = len(centres)
    grid = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(n, radius_cs),
        index=pd.RangeIndex(n),
        transformations=shape_tf,
    )
    logger.info(
        "Spot grid over %s: %d %s spots, %g µm spacing, %g µm diameter, mask %s",
        image_key,
        n,
        lattice,
        spacing_um,
        diameter_um,
        "none" if mask is None else (mask if isinstance(mask, str) else "given"),
    )
    if not inplace:
        return grid
    sdata.shapes[key_added] = grid
    return None
