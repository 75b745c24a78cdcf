"""Helpers shared by the grid and aggregation functions: element keys, image frames, squares, extents.

Conventions (the same as :func:`genedml_sd.pp.spot_grid`): lattices are laid out in the full-resolution
(``scale0``) pixel frame of an image, whose pixels are square with the recorded pixel size (µm/px), so
a length of ``L`` µm is ``L / um_per_px`` px; a position in µm is its ``scale0`` pixel position times
the pixel size. New shapes are stored in the coordinate system of the image (``"global"`` when the
image has it) with an ``Identity`` to it, and reach the image's other systems through its own
transformations. Pixel ``i`` covers ``[i, i + 1)`` in continuous pixel coordinates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import affine_to_pixels

if TYPE_CHECKING:
    from spatialdata import SpatialData


def check_new_key(sdata: SpatialData, key: str, kind: str, overwrite: bool) -> None:
    """Raise a ``KeyError`` if ``key`` names an element that must not be replaced.

    An existing element of the same ``kind`` (``"labels"``, ``"shapes"``, ``"tables"``) is replaced
    only with ``overwrite=True``; an element of another kind is never replaced.
    """
    if key not in sdata:
        return
    if not overwrite:
        raise KeyError(f"Element {key!r} already exists; pass overwrite=True to replace it, or another key_added.")
    if key not in getattr(sdata, kind):
        raise KeyError(f"Element {key!r} exists and is not a {kind} element; choose another key_added.")


def image_frame(image: Any) -> tuple[str, np.ndarray, dict[str, Any]]:
    """Where new shapes over ``image`` are stored.

    Returns
    -------
    ``(cs, affine, transformations)``: the coordinate system the shapes are written in (``"global"``
    when the image has it, else the first in sorted order), the 3x3 affine matrix mapping the image's
    ``scale0`` pixels ``(x, y, 1)`` to that system, and the transformations of the new element
    (``Identity`` to ``cs``, the image's own transformations composed with it for the other systems).
    """
    from spatialdata.transformations import Identity, Sequence, get_transformation

    transforms = get_transformation(image, get_all=True)
    cs = "global" if "global" in transforms else sorted(transforms)[0]
    to_cs = transforms[cs]
    affine = np.asarray(to_cs.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    shape_tf: dict[str, Any] = {cs: Identity()}
    for other, t in transforms.items():
        if other != cs:
            shape_tf[other] = Sequence([to_cs.inverse(), t])
    return cs, affine, shape_tf


def square_polygons(lower_px: np.ndarray, side_px: float, affine: np.ndarray) -> np.ndarray:
    """Squares of side ``side_px`` (``scale0`` px) with lower corners ``lower_px`` (n, 2), mapped by ``affine``.

    The squares are axis-aligned in the image's pixel frame; in the target system they are the exact
    images of those squares (rectangles for a scale and translation, parallelograms under rotation or
    shear). Vectorised: about a second per million squares.

    Returns
    -------
    Array (n,) of shapely polygons with their 4 corners (closed rings of 5 vertices) in the target
    system; ``shapely.bounds`` of a square gives its corners when the map is a scale and translation.
    """
    import shapely

    lower_px = np.asarray(lower_px, dtype=np.float64).reshape(-1, 2)
    lin, off = affine[:2, :2], affine[:2, 2]
    axis_aligned = lin[0, 1] == 0 and lin[1, 0] == 0
    if axis_aligned:
        # corners map independently per axis; shapely.box is the fastest constructor
        x0 = lower_px[:, 0] * lin[0, 0] + off[0]
        x1 = (lower_px[:, 0] + side_px) * lin[0, 0] + off[0]
        y0 = lower_px[:, 1] * lin[1, 1] + off[1]
        y1 = (lower_px[:, 1] + side_px) * lin[1, 1] + off[1]
        return shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))
    steps = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.float64) * side_px
    corners = lower_px[:, None, :] + steps[None, :, :]  # (n, 5, 2) scale0 px
    mapped = corners @ lin.T + off
    n = len(lower_px)
    return shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, mapped.reshape(-1, 2), (np.arange(0, 5 * n + 1, 5), np.arange(n + 1))
    )


def shape_extent_px(sdata: SpatialData, shapes_key: str, image_key: str) -> np.ndarray:
    """Lower-left corner ``(x, y)`` (``scale0`` px) of a box enclosing every observation (circles with their radius).

    Exact for shapes related to the image by a scale and translation; under rotation, the corner of
    the pixel-frame box around the mapped bounding box of the shapes.
    """
    shapes = sdata[shapes_key]
    x0, y0, x1, y1 = (float(v) for v in shapes.total_bounds)
    if "radius" in shapes.columns:
        r = float(np.nanmax(shapes["radius"].to_numpy(dtype=np.float64))) if len(shapes) else 0.0
        x0, y0, x1, y1 = x0 - r, y0 - r, x1 + r, y1 + r
    m = affine_to_pixels(sdata, shapes_key, image_key)
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) @ m[:2, :2].T + m[:2, 2]
    return corners.min(axis=0)
