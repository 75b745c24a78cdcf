"""Tissue masks of brightfield (H&E) images, computed on a coarse pyramid level.

:func:`tissue_mask` separates stained tissue from background on a coarse pyramid level (never the
full-resolution image) and stores it as a labels element aligned with the image.

Two detectors are available (``method=``):

- ``"saturation"`` (default) first rejects background by colour, as tissue detectors of digital
  pathology do with the HSV colour space: black (brightest channel below :data:`BLACK_VALUE`, e.g.
  the dark area outside the glass of a slide scan), grey (HSV saturation below
  :data:`GREY_SATURATION`, measured on colours smoothed over :data:`COLOUR_SMOOTH_UM`: grey scanner
  background, achromatic glass) and white (every channel above :data:`WHITE_VALUE`). Haematoxylin and eosin are saturated purple and pink; bare glass is
  white or faintly tinted. Tissue is then where the optical density exceeds an Otsu threshold
  estimated on glass and tissue only (black, and grey darker than :data:`GLASS_VALUE`, left out),
  so that black or grey areas do not drag the threshold up.
- ``"otsu"``, ``"triangle"`` or a fixed number: the optical density of the darkest channel alone
  (the earlier default), threshold by Otsu on log optical density, the triangle method, or the
  given optical density. It marks black and grey areas as tissue.

On the five HER2ST sections with images and the demo both give the same masks on glass slides;
on slides with black or grey areas only ``"saturation"`` rejects them.

Geometry: pixel ``i`` of a level covers ``[i, i + 1)`` in continuous pixel coordinates; the mask
carries the transformations of the image composed with its pixel size relative to ``scale0``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genedml_sd._spatial import get_pixel_size, image_levels, level_downsampling, resolve_key

from ._shapes import check_new_key

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

MIN_TISSUE_OD = 0.05
"""Lowest optical density (darkest channel, log10) ever called tissue; blank glass is about 0-0.03."""

SMOOTH_UM = 32.0
"""Gaussian smoothing (µm) of the optical density before estimating the threshold."""

CLOSING_UM = 40.0
"""Radius (µm) of the binary closing that joins the gaps of loose tissue (stroma, fat)."""

BLACK_VALUE = 0.2
"""Pixels whose brightest channel is below this fraction of full scale are black background."""

GREY_SATURATION = 0.05
"""Pixels of lower HSV saturation ``(max - min) / max`` are achromatic (grey, black or white), never tissue."""

GLASS_VALUE = 0.75
"""Grey pixels whose brightest channel reaches this fraction may be glass: they count for the threshold."""

WHITE_VALUE = 0.9
"""Pixels whose darkest channel exceeds this fraction of full scale are white background."""

COLOUR_SMOOTH_UM = 16.0
"""Gaussian smoothing (µm) of the colours before measuring their saturation (sensor noise is not colour)."""

_LOG_EPS = 0.01
"""Offset of the log transform used by the Otsu threshold (optical density units)."""

_METHODS = ("saturation", "otsu", "triangle")


# --------------------------------------------------------------------------------------------- helpers
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


def _background(arr: np.ndarray, max_value: float, sigma_px: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Background of an RGB array (3, h, w): boolean maps (h, w) of its kinds, and the glass-or-tissue pixels.

    ``black``: brightest channel below :data:`BLACK_VALUE`; ``white``: every channel above
    :data:`WHITE_VALUE`; ``grey``: neither, HSV saturation below :data:`GREY_SATURATION` (grey, or
    achromatic glass). None of them is ever tissue. The second map marks the pixels the optical-density
    threshold is estimated on: everything except black and the grey pixels darker than glass
    (brightest channel below :data:`GLASS_VALUE`), so that white, grey or tinted glass stays in.
    The saturation is that of the colours smoothed by a Gaussian of ``sigma_px`` pixels, so that sensor
    noise in grey areas does not look like colour.
    """
    from scipy import ndimage

    brightest = arr.max(axis=0) / max_value
    darkest = arr.min(axis=0) / max_value
    smooth = ndimage.gaussian_filter(arr, (0, sigma_px, sigma_px)) if sigma_px > 0 else arr
    s_max, s_min = smooth.max(axis=0), smooth.min(axis=0)
    saturation = np.divide(s_max - s_min, s_max, out=np.zeros_like(s_max, dtype=np.float64), where=s_max > 0)
    black = brightest < BLACK_VALUE
    white = ~black & (darkest > WHITE_VALUE)
    grey = ~black & ~white & (saturation < GREY_SATURATION)
    population = ~black & ~(grey & (brightest < GLASS_VALUE))
    return {"black": black, "grey": grey, "white": white}, population


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


def _smoothed(od: np.ndarray, sigma_px: float, population: np.ndarray | None) -> np.ndarray:
    """Optical density smoothed by a Gaussian of ``sigma_px``; the values of ``population`` pixels, 1-D.

    With a population, the smoothing is normalised over it (pixels outside do not leak in).
    """
    from scipy import ndimage

    if population is None:
        return ndimage.gaussian_filter(od, sigma_px) if sigma_px > 0 else od
    if sigma_px <= 0:
        return od[population]
    weight = ndimage.gaussian_filter(population.astype(np.float64), sigma_px)
    total = ndimage.gaussian_filter(np.where(population, od, 0.0), sigma_px)
    return (total / np.maximum(weight, 1e-12))[population]


def _threshold(od: np.ndarray, method: str | float, sigma_px: float, population: np.ndarray | None = None) -> float:
    """Optical-density threshold separating tissue from glass (estimated on ``population`` pixels if given)."""
    from skimage.filters import threshold_otsu, threshold_triangle

    if not isinstance(method, str):
        value = float(method)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"A fixed tissue threshold must be a positive optical density, got {method!r}.")
        return value
    if population is not None and not population.any():
        return math.inf
    smooth = _smoothed(od, sigma_px, population)
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


def _no_tissue_message(
    image_key: str,
    where: str,
    od: np.ndarray,
    method: str | float,
    raw: float,
    n_px: int,
    background: dict[str, np.ndarray] | None = None,
    population: np.ndarray | None = None,
) -> str:
    """Why no tissue was found: the measured optical densities, the threshold and what exceeded it."""
    q = np.quantile(od, [0.0, 0.5, 0.99, 1.0]) + 0.0  # no '-0' for white glass
    algo = "otsu" if background is not None else method
    if not math.isfinite(raw):
        how = f"the image is uniform (no contrast after {SMOOTH_UM:g} µm smoothing), so {algo!r} finds no threshold"
        if population is not None and not population.any():
            how = f"every pixel is black or grey background, so {algo!r} finds no threshold"
    else:
        how = f"the {'fixed' if not isinstance(algo, str) else repr(algo)} threshold is {raw:.3g}"
        if raw < MIN_TISSUE_OD:
            how += f", raised to the minimal tissue optical density {MIN_TISSUE_OD:g}"
        how += f"; {n_px} px exceed it" + (", all in too small pieces" if n_px else "")
    if background is not None:
        counts = ", ".join(f"{int(v.sum())} px {k}" for k, v in background.items())
        how += f" (method 'saturation' excluded background: {counts} of {od.size} px)"
    return (
        f"Found no tissue in image {image_key!r} ({where}): its optical density (darkest channel, log10; glass is "
        f"about 0-0.03) ranges {q[0]:.3g}-{q[3]:.3g} (median {q[1]:.3g}, 99th percentile {q[2]:.3g}) and {how}. "
        "Check the image, or pass method='otsu' (optical density alone), a fixed optical-density threshold as "
        "method=... or a smaller min_area_um2."
    )


def mask_transformations(image: Any, scale_xy: tuple[float, float]) -> dict[str, Any]:
    """Transformations of a mask whose pixel is ``scale_xy`` scale0 pixels, in every system of ``image``."""
    from spatialdata.transformations import Scale, Sequence, get_transformation

    to_scale0 = Scale([scale_xy[0], scale_xy[1]], axes=("x", "y"))
    return {cs: Sequence([to_scale0, t]) for cs, t in get_transformation(image, get_all=True).items()}


def _check_method(method: Any) -> None:
    if isinstance(method, str) and method not in _METHODS:
        raise ValueError(
            f"method must be 'saturation', 'otsu', 'triangle' or a positive optical density, got {method!r}."
        )


# --------------------------------------------------------------------------------------------- tissue mask
def tissue_mask(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    level: int | None = None,
    target_um_per_px: float = 16.0,
    method: Literal["saturation", "otsu", "triangle"] | float = "saturation",
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
    the optical density of the darkest channel exceeds a threshold (never below 0.05) and, with the
    default ``method="saturation"``, the pixel is not black, grey or white background (see the module
    documentation); gaps narrower than about 80 µm are closed, enclosed holes smaller than
    ``max_hole_um2`` filled and tissue pieces smaller than ``min_area_um2`` removed.

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
        ``"saturation"``: reject black (brightest channel < 20 % of full scale), grey (HSV saturation
        < 0.05) and white (every channel > 90 %) background, and threshold the optical density by Otsu
        (on its log) estimated without black and dark grey (brightest channel < 75 %) pixels. ``"otsu"`` (on log optical
        density), ``"triangle"`` or a fixed optical-density threshold: the optical density alone, over
        all pixels (black and grey areas count as tissue). Grey (single-channel) images have no
        saturation: ``"saturation"`` then falls back to ``"otsu"`` with a warning.
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
        If no tissue is found (the message gives the measured optical densities and threshold).
    """
    from spatialdata.models import Labels2DModel

    image_key = resolve_key(sdata, "images", image_key)
    key_added = key_added or f"{image_key}_tissue"
    if inplace:
        check_new_key(sdata, key_added, "labels", overwrite)
    _check_method(method)
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
    arr = np.nan_to_num(arr, nan=max_value)
    od = _optical_density(arr, max_value)
    if method == "saturation" and arr.shape[0] == 1:
        logger.warning("Image %r has a single (grey) channel: no saturation; using method='otsu'.", image_key)
        method = "otsu"

    ds = level_downsampling(levels)[k] * factor  # scale0 px per mask px, (y, x)
    mask_um = float(np.sqrt(um[0, 0] * um[0, 1]) * np.sqrt(ds[0] * ds[1]))  # µm per mask px
    background, population = (None, None)
    if method == "saturation":
        background, population = _background(arr.astype(np.float64), max_value, COLOUR_SMOOTH_UM / mask_um)
    raw_thr = _threshold(od, "otsu" if background is not None else method, SMOOTH_UM / mask_um, population)
    thr = max(raw_thr, MIN_TISSUE_OD)
    mask = od > thr
    if background is not None:
        mask &= ~(background["black"] | background["grey"] | background["white"])
    n_above = int(mask.sum())
    mask = _pad_closing(mask, int(round(CLOSING_UM / mask_um)))
    mask = _fill_small_holes(mask, max_hole_um2 / mask_um**2)
    mask = _remove_small(mask, min_area_um2 / mask_um**2)
    if not mask.any():
        where = f"level {k}, {mask_um:.3g} µm/px, pieces >= {min_area_um2:g} µm²"
        raise ValueError(_no_tissue_message(image_key, where, od, method, raw_thr, n_above, background, population))
    logger.info(
        "Tissue mask of %s from level %d at %.3g µm/px: %.1f%% tissue (method %s, OD threshold %.3f)",
        image_key,
        k,
        mask_um,
        100 * mask.mean(),
        method,
        thr,
    )
    labels = Labels2DModel.parse(
        mask.astype(np.uint8),
        dims=("y", "x"),
        transformations=mask_transformations(image, (float(ds[1]), float(ds[0]))),
    )
    if not inplace:
        return labels
    sdata.labels[key_added] = labels
    return None
