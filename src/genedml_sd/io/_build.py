"""Assemble a spot-based SpatialData object (H&E pyramid + circles + counts table)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd._spatial import ATTRS_KEY, set_pixel_size

if TYPE_CHECKING:
    import dask.array as da
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
MIN_LEVEL_SIDE = 512
CHUNK = 1024


def pyramid_scale_factors(height: int, width: int, min_side: int = MIN_LEVEL_SIDE) -> list[int]:
    """Halving factors so that the coarsest level's short side is about ``min_side`` px (at least one level)."""
    factors: list[int] = []
    side: float = min(height, width)
    while side / 2 >= min_side:
        factors.append(2)
        side /= 2
    return factors


def build_spot_sdata(
    image: np.ndarray | da.Array,
    *,
    um_per_px: float,
    spots_xy: np.ndarray,
    spot_radius: float,
    counts: Any,
    obs: pd.DataFrame,
    var_names: pd.Index,
    sample_id: str,
    image_to_spots_scale: tuple[float, float] = (1.0, 1.0),
    sample_info: Mapping[str, Any] | None = None,
    image_dims: tuple[str, str, str] = ("y", "x", "c"),
) -> SpatialData:
    """Build a SpatialData with an H&E pyramid, circle spots and a counts table.

    Parameters
    ----------
    image
        RGB image, ``uint8``, in ``image_dims`` order (default ``(y, x, c)``).
    um_per_px
        Micrometres per pixel of ``image`` (full resolution).
    spots_xy
        Spot centres, shape (n_spots, 2), as ``(x, y)`` in the spot coordinate frame, which is also
        the ``"global"`` coordinate system.
    spot_radius
        Spot radius in units of the spot coordinate frame.
    counts
        Raw counts, shape (n_spots, n_genes), dense or sparse, integer valued.
    obs
        Per-spot annotations, ``n_spots`` rows; its index becomes ``obs_names``.
    var_names
        Gene names, ``n_genes``.
    sample_id
        Prefix of element names: image ``f"{sample_id}_he"``, shapes ``f"{sample_id}_spots"``; the
        table is ``"table"``.
    image_to_spots_scale
        ``(sx, sy)`` multipliers from image pixels to spot-frame units (``image px * s = spot units``),
        stored as the image's transformation to ``"global"``.
    sample_info
        Sample metadata (patient, section, technology...) stored in ``table.uns["genedml_sd"]`` and as
        ``obs`` columns.
    image_dims
        Axis order of ``image``.
    """
    import scipy.sparse as sp
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    image_key, shapes_key = f"{sample_id}_he", f"{sample_id}_spots"
    order = [image_dims.index(a) for a in ("c", "y", "x")]
    image_cyx = image.transpose(order)
    if image_cyx.shape[0] != 3:
        raise ValueError(f"Image of sample {sample_id!r} must have 3 (RGB) channels, got shape {image.shape}.")
    sx, sy = image_to_spots_scale
    img_tf = Identity() if (sx, sy) == (1.0, 1.0) else Scale([sx, sy], axes=("x", "y"))
    factors = pyramid_scale_factors(image_cyx.shape[1], image_cyx.shape[2])
    image_el = Image2DModel.parse(
        image_cyx,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=factors or None,
        chunks=(3, CHUNK, CHUNK),
        transformations={"global": img_tf},
    )

    n = len(spots_xy)
    shapes = ShapesModel.parse(
        np.asarray(spots_xy, dtype=np.float64),
        geometry=0,
        radius=np.full(n, float(spot_radius)),
        index=pd.RangeIndex(n),
        transformations={"global": Identity()},
    )

    x = sp.csr_matrix(counts) if not sp.issparse(counts) else counts.tocsr()
    data = x.data
    if not np.all(np.isfinite(data)):
        raise ValueError(f"Counts of sample {sample_id!r} contain NaN or infinite values.")
    if np.any(data < 0) or np.any(data != np.round(data)):
        raise ValueError(f"Counts of sample {sample_id!r} must be non-negative integers (raw counts).")
    x = x.astype(np.int32)
    obs = obs.copy()
    obs[REGION_KEY] = pd.Categorical([shapes_key] * n)
    obs[INSTANCE_KEY] = np.arange(n, dtype=np.int64)
    info = {"sample": sample_id, **dict(sample_info or {})}
    for k in ("patient", "section", "sample"):
        if k in info:
            obs[k] = pd.Categorical([str(info[k])] * n)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    adata.var_names_make_unique()
    adata.obsm["spatial"] = np.asarray(spots_xy, dtype=np.float64)
    adata.uns[ATTRS_KEY] = {**info, "image_key": image_key, "shapes_key": shapes_key}
    table = TableModel.parse(adata, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    sdata = SpatialData(images={image_key: image_el}, shapes={shapes_key: shapes}, tables={"table": table})
    set_pixel_size(sdata, image_key, um_per_px)
    logger.info(
        "Built sample %s: %d spots, %d genes, image %s at %.3f µm/px (%d pyramid levels)",
        sample_id,
        n,
        adata.n_vars,
        tuple(image_cyx.shape),
        um_per_px,
        len(factors) + 1,
    )
    return sdata


def pixel_size_from_lattice(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float) -> float:
    """Estimate µm/px from spots on a regular array: fit pixel position against array index.

    Parameters
    ----------
    array_xy
        Array coordinates (column, row) in lattice steps, shape (n, 2).
    pixel_xy
        Pixel coordinates of the same spots, shape (n, 2).
    pitch_um
        Centre-to-centre distance of one lattice step, in µm (200 for legacy ST).

    Returns
    -------
    Micrometres per pixel, averaged over both axes.
    """
    slopes = []
    for axis in (0, 1):
        a = array_xy[:, axis]
        if np.ptp(a) == 0:
            continue
        slope = np.polyfit(a, pixel_xy[:, axis], 1)[0]
        slopes.append(abs(slope))
    if not slopes or not all(math.isfinite(s) and s > 0 for s in slopes):
        raise ValueError("Cannot estimate the pixel size: spots do not span the array in any direction.")
    return float(pitch_um / np.mean(slopes))
