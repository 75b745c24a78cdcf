"""A histology-free yardstick: each observation predicted by the mean expression of its neighbours.

Expression is spatially autocorrelated, so the measured expression of the adjacent spots of a
section predicts a spot better than chance without looking at the image. This reference uses the
measured expression of the test slide itself: it is a yardstick for what spatial smoothness alone
gives (a method reading the H&E image is compared with it, and with shuffled labels), not a
competing method.

Adjacency is computed with a k-d tree (:class:`scipy.spatial.cKDTree`) and applied as a sparse
row-normalised matrix, so it scales to 10^6 observations: the memory is that of the pairs of
neighbours (about 8 per observation on a spot lattice) and of the (n_obs, n_genes) result.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from genedml_sd._spatial import get_pixel_size, spots_to_pixels

from ._data import resolve_slide_keys, slide_expression

if TYPE_CHECKING:
    from spatialdata import SpatialData

RADIUS_FACTOR = 1.5
"""Default adjacency radius, in units of the median nearest-neighbour centre distance."""

_BLOCK = 1 << 22
"""About this many output values (rows x genes) are computed at a time."""


def default_radius(coords: np.ndarray) -> float:
    """:data:`RADIUS_FACTOR` x the median distance from each centre to its nearest other centre.

    Parameters
    ----------
    coords
        Observation centres (n_obs, 2), n_obs >= 2.

    Returns
    -------
    The radius, in the units of ``coords``.

    Raises
    ------
    ValueError
        If there are fewer than 2 observations, or more than half of them share their centre with
        another one (the median distance is 0).
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        raise ValueError(f"The default radius needs at least 2 observations, got {len(coords)}; pass radius=.")
    dist, _ = cKDTree(coords).query(coords, k=2)
    median = float(np.median(dist[:, 1]))
    if median <= 0:
        raise ValueError(
            "The median nearest-neighbour distance of the observations is 0 (more than half of them share their "
            "centre with another one); pass radius= explicitly."
        )
    return RADIUS_FACTOR * median


def _check_coords(coords: Any) -> np.ndarray:
    """``coords`` as a finite float64 (n_obs, 2) array, or a ``ValueError`` naming the problem."""
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be an (n_obs, 2) array of centres, got shape {c.shape}.")
    if not np.isfinite(c).all():
        raise ValueError(f"coords contain {int((~np.isfinite(c)).any(axis=1).sum())} non-finite centres.")
    return c


def neighbour_adjacency(coords: Any, radius: float | None = None) -> sp.csr_matrix:
    """Row-normalised adjacency of observations within ``radius`` of each other, excluding themselves.

    Parameters
    ----------
    coords
        Observation centres (n_obs, 2), in µm or pixels.
    radius
        Two distinct observations are adjacent when their centres are at most ``radius`` apart (units
        of ``coords``). Default: ``default_radius``.

    Returns
    -------
    float64 CSR matrix (n_obs, n_obs): row ``i`` holds ``1 / k_i`` at each of the ``k_i`` neighbours
    of ``i`` (a zero row when ``i`` has none); the diagonal is empty.
    """
    from scipy.spatial import cKDTree

    c = _check_coords(coords)
    if radius is None:
        radius = default_radius(c)
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a positive finite distance (units of coords), got {radius!r}.")
    n = len(c)
    pairs = cKDTree(c).query_pairs(float(radius), output_type="ndarray")  # i < j, distance <= radius
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)
    degree = np.bincount(rows, minlength=n)
    weights = 1.0 / degree[rows] if len(rows) else np.empty(0)
    return sp.csr_matrix((weights, (rows, cols)), shape=(n, n))


def neighbour_mean_expression(coords: Any, expression: Any, *, radius: float | None = None) -> np.ndarray:
    """Predict each observation by the mean measured expression of its adjacent observations.

    Observation ``i`` is predicted by the unweighted mean of the rows of ``expression`` of the other
    observations whose centres lie within ``radius`` of its own (itself excluded; other observations
    at the same centre count as neighbours). The default radius is ``1.5`` x the median
    nearest-neighbour centre distance (``default_radius``): on a square
    ST lattice of pitch ``p`` an interior spot has its 4 edge neighbours (at ``p``) and its 4
    diagonal ones (at ``1.41 p``), 8 in all; on a Visium hexagonal lattice its 6 neighbours (the
    next ring is at ``1.73 p``). Spots at the edge of the tissue have fewer.

    Parameters
    ----------
    coords
        Observation centres (n_obs, 2), in µm or pixels (only relative distances matter with the
        default radius).
    expression
        Measured expression (n_obs, n_genes), e.g. log-normalised, a dense array or a scipy sparse
        matrix (never densified beyond the result).
    radius
        Adjacency radius in the units of ``coords`` (inclusive), > 0. Default: see above.

    Returns
    -------
    Array (n_obs, n_genes) of dtype ``numpy.result_type(expression.dtype, numpy.float32)`` (float32
    for float32 input, float64 for float64 or int64 input; sums are accumulated in float64).
    Observations with no neighbour within ``radius`` get rows of NaN.

    Raises
    ------
    ValueError
        If ``coords`` is not a finite (n_obs, 2) array, ``expression`` is not 2-D with n_obs rows,
        ``radius`` is not a positive finite number, or the default radius cannot be computed (fewer
        than 2 observations, or most of them share their centre).
    """
    x = expression if sp.issparse(expression) else np.asarray(expression)
    c = _check_coords(coords)
    if x.ndim != 2 or x.shape[0] != len(c):
        raise ValueError(f"expression must be (n_obs={len(c)}, n_genes), got shape {x.shape}.")
    if sp.issparse(x):
        x = sp.csr_matrix(x)
    adjacency = neighbour_adjacency(c, radius)
    n, n_genes = x.shape
    out = np.empty((n, n_genes), dtype=np.result_type(x.dtype, np.float32))
    step = max(1, _BLOCK // max(1, n_genes))
    for a in range(0, n, step):
        block = adjacency[a : a + step] @ x
        out[a : a + step] = block.toarray() if sp.issparse(block) else block
    out[np.diff(adjacency.indptr) == 0] = np.nan
    return out


def neighbour_reference(
    sdata: SpatialData,
    genes: Sequence[str],
    *,
    shapes_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    radius: float | None = None,
    image_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour-mean reference prediction and observed expression of one slide.

    The observed expression is the log-normalised expression of ``genes``
    (:func:`~genedml_sd.pp.normalized_expression`: library size over all genes of the table); each
    spot is predicted by the mean observed expression of its adjacent spots
    (:func:`neighbour_mean_expression`), spot centres being taken in µm (through the pixel size of
    the image). Spots with no neighbour within ``radius`` are predicted by the slide mean of the
    observed expression (over all spots), so both arrays keep every spot.

    Parameters
    ----------
    sdata
        A slide with an image (with a recorded pixel size), spots and a raw-counts table.
    genes
        Gene names of the table, in this order (n_genes).
    shapes_key, table_key, image_key
        The spots, their counts table and the image giving µm coordinates; each inferred when
        unambiguous.
    layer
        Layer of the table holding raw counts (default ``X``).
    radius
        Adjacency radius in µm. Default: 1.5 x the median nearest-neighbour centre distance (the 8
        neighbours of an ST spot, the 6 of a Visium spot).

    Returns
    -------
    ``(predicted, observed)``, float32 arrays (n_spots, n_genes), spots in the order of the shapes
    element.

    Raises
    ------
    KeyError
        If an element cannot be resolved, genes are absent from the table, or the image has no pixel
        size.
    ValueError
        As :func:`neighbour_mean_expression`, or if the counts are not raw.
    """
    keys = resolve_slide_keys(sdata, image_key, shapes_key, table_key, need_table=True)
    observed = slide_expression(sdata, keys, genes, layer=layer)
    coords_um = spots_to_pixels(sdata, keys.shapes_key, keys.image_key) * get_pixel_size(sdata, keys.image_key)
    predicted = neighbour_mean_expression(coords_um, observed, radius=radius)
    isolated = np.isnan(predicted).all(axis=1) if predicted.shape[1] else np.zeros(len(predicted), dtype=bool)
    if isolated.any():
        predicted[isolated] = observed.mean(axis=0, dtype=np.float64).astype(predicted.dtype)
    return predicted, observed
