"""Multiscale image elements built from existing pyramid levels, without recomputing them from level 0.

:meth:`spatialdata.models.Image2DModel.parse` with ``scale_factors`` derives every level from the full
resolution, so reading a coarse level of a whole-slide image would decode the whole slide. Here the levels a
file already holds are used as they are; missing coarse levels are added lazily by 2 x 2 averaging of the
coarsest one (a window of such a level decodes only the matching region of the level above).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._build import MIN_LEVEL_SIDE

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

EVEN_CHUNK = 1024


def extend_levels(levels: Sequence[da.Array], min_side: int = MIN_LEVEL_SIDE) -> list[da.Array]:
    """Append halved levels until the coarsest level's short side is about ``min_side`` px.

    Parameters
    ----------
    levels
        ``(c, y, x)`` dask arrays, finest first (each about half the previous one).
    min_side
        Stop when halving would bring the short side under this size (px).

    Returns
    -------
    The same levels plus lazily averaged ones (2 x 2 means, rounded, in the input dtype).
    """
    import dask.array as da

    out = list(levels)
    while min(out[-1].shape[1:]) / 2 >= min_side:
        last = out[-1]
        h, w = (last.shape[1] // 2) * 2, (last.shape[2] // 2) * 2
        cy = max(2, min(EVEN_CHUNK, (max(last.chunksize[1], 2) // 2) * 2))
        cx = max(2, min(EVEN_CHUNK, (max(last.chunksize[2], 2) // 2) * 2))
        even = last[:, :h, :w].rechunk((last.shape[0], cy, cx))
        mean = da.coarsen(np.mean, even, {1: 2, 2: 2})
        if np.issubdtype(last.dtype, np.integer):
            mean = da.round(mean)
        out.append(mean.astype(last.dtype))
    return out


def _level_coords(n: int, n0: int) -> np.ndarray:
    """Pixel-centre coordinates of a level with ``n`` px over ``n0`` level-0 px (as spatialdata computes them)."""
    return np.linspace(0, n0, n + 1)[:-1] + n0 / n / 2


def multiscale_image(
    levels: Sequence[da.Array | np.ndarray],
    transformations: Mapping[str, Any] | None = None,
    *,
    c_coords: Sequence[str] = ("r", "g", "b"),
) -> xr.DataTree:
    """A validated multiscale image element (``scale0``, ``scale1``, ...) from given ``(c, y, x)`` levels.

    Parameters
    ----------
    levels
        Pyramid levels, finest first, each ``(c, y, x)``; kept lazy (numpy arrays are wrapped in dask).
    transformations
        Transformation of ``scale0`` to each coordinate system (default: ``Identity`` to ``"global"``);
        the coarser levels get it composed with their scale to ``scale0``, as spatialdata does.
    c_coords
        Channel names.

    Returns
    -------
    A :class:`xarray.DataTree` that passes :class:`spatialdata.models.Image2DModel` validation.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation

    if not levels:
        raise ValueError("An image needs at least one pyramid level.")
    h0, w0 = levels[0].shape[1:]
    nodes = {}
    for k, level in enumerate(levels):
        el = Image2DModel.parse(level, dims=("c", "y", "x"), c_coords=list(c_coords))
        n_y, n_x = level.shape[1:]
        el = el.assign_coords(y=_level_coords(n_y, h0), x=_level_coords(n_x, w0))
        nodes[f"scale{k}"] = xr.Dataset({"image": el})
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, dict(transformations or {"global": Identity()}), set_all=True)
    Image2DModel().validate(tree)
    return tree
