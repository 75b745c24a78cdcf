"""Pixel size and orientation of a regular spot / bin array from its array indices and pixel positions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VISIUM_STEP_UM = (50.0, 50.0 * math.sqrt(3.0))
"""µm per ``array_col`` and per ``array_row`` step of the Visium hexagonal array (100 µm centre to centre)."""


@dataclass(frozen=True)
class LatticeFit:
    """Affine fit of pixel positions against physical array positions.

    Attributes
    ----------
    um_per_px
        Micrometres per pixel, ``1 / sqrt(|det A|)``.
    px_per_um
        ``A``, 2 x 2: pixel ``(x, y)`` per µm along the array's ``(col, row)`` directions (columns of ``A``).
    anisotropy
        Ratio of the singular values of ``A`` (1 for a lattice seen without stretch or shear).
    rms_px
        Root mean square residual of the fit, in px.
    n
        Number of points fitted.
    """

    um_per_px: float
    px_per_um: np.ndarray
    anisotropy: float
    rms_px: float
    n: int


def fit_lattice(array_colrow: np.ndarray, pixel_xy: np.ndarray, step_um: tuple[float, float]) -> LatticeFit:
    """Fit ``pixel = A @ (col * step_x, row * step_y) + t`` by least squares (any rotation, flip or axis swap).

    Parameters
    ----------
    array_colrow
        Array indices ``(array_col, array_row)`` of each spot or bin, shape (n, 2).
    pixel_xy
        Their pixel positions ``(x, y)`` = (column, row) in the image, shape (n, 2).
    step_um
        µm per column step and per row step (Visium: 50 and 86.6; square bins: the bin size twice).

    Returns
    -------
    The :class:`LatticeFit`.

    Raises
    ------
    ValueError
        If fewer than 3 finite points are given or they lie on a line.
    """
    a = np.asarray(array_colrow, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(a).all(axis=1) & np.isfinite(p).all(axis=1)
    a, p = a[ok], p[ok]
    if len(a) < 3:
        raise ValueError(f"Cannot fit the spot lattice: {len(a)} spots with finite positions (at least 3 needed).")
    u = a * np.asarray(step_um, dtype=np.float64)
    design = np.column_stack([u - u.mean(axis=0), np.ones(len(u))])
    if np.linalg.matrix_rank(design[:, :2]) < 2:
        raise ValueError("Cannot fit the spot lattice: the spots lie on one line of the array.")
    coef, *_ = np.linalg.lstsq(design, p, rcond=None)
    matrix = coef[:2].T  # px per µm, columns = array directions
    det = abs(float(np.linalg.det(matrix)))
    if not det > 0:
        raise ValueError("Cannot fit the spot lattice: pixel positions do not vary with the array indices.")
    sv = np.linalg.svd(matrix, compute_uv=False)
    resid = p - design @ coef
    return LatticeFit(
        um_per_px=1.0 / math.sqrt(det),
        px_per_um=matrix,
        anisotropy=float(sv[0] / sv[-1]),
        rms_px=float(np.sqrt((resid**2).sum(axis=1).mean())),
        n=len(a),
    )


def square_bins(centres_xy: np.ndarray, fit: LatticeFit, bin_um: float) -> np.ndarray:
    """Corner coordinates of square bins oriented along the fitted lattice, shape (n, 5, 2) (closed rings).

    Each bin is the image of the square ``[-bin/2, bin/2]^2`` µm of the array through ``fit.px_per_um``,
    centred on its pixel position: side ``bin_um / um_per_px`` px when the lattice has no stretch.
    """
    half = bin_um / 2.0
    corners_um = np.array([[-half, -half], [half, -half], [half, half], [-half, half], [-half, -half]])
    offsets = corners_um @ fit.px_per_um.T  # (5, 2) px
    return np.asarray(centres_xy, dtype=np.float64)[:, None, :] + offsets[None, :, :]
