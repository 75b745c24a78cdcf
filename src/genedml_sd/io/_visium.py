"""10x Visium through spatialdata-io, with the physical pixel size recorded."""

from __future__ import annotations

import math
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import ATTRS_KEY, set_pixel_size

if TYPE_CHECKING:
    from spatialdata import SpatialData

VISIUM_SPOT_DIAMETER_UM = 55.0


def record_pixel_sizes_from_spots(sdata: SpatialData, shapes_key: str, spot_diameter_um: float) -> dict[str, float]:
    """Record µm/px of every image from the known physical diameter of the spots in ``shapes_key``.

    The spots give µm per unit of their coordinate system; each image's pixel size then follows from
    its transformation to that system (``sqrt(|det A|)`` of its affine part).

    Returns
    -------
    Mapping image name -> µm/px of its ``scale0``.
    """
    from spatialdata.transformations import get_transformation

    shapes = sdata[shapes_key]
    diameter_units = 2 * float(np.median(shapes["radius"].to_numpy()))
    um_per_unit = spot_diameter_um / diameter_units
    shape_systems = get_transformation(shapes, get_all=True)
    sizes = {}
    for name, image in sdata.images.items():
        img_systems = get_transformation(image, get_all=True)
        common = sorted(set(img_systems) & set(shape_systems))
        if not common:
            continue
        cs = common[0]
        shape_scale = _linear_scale(shape_systems[cs])
        img_scale = _linear_scale(img_systems[cs])
        sizes[name] = um_per_unit * img_scale / shape_scale
        set_pixel_size(sdata, name, sizes[name])
    return sizes


def _linear_scale(transformation: Any) -> float:
    m = transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return math.sqrt(abs(float(np.linalg.det(np.asarray(m)[:2, :2]))))


def visium(
    path: str | PathLike,
    *,
    dataset_id: str | None = None,
    patient: str | None = None,
    section: str | None = None,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Visium output folder with :func:`spatialdata_io.visium` and record pixel sizes.

    Parameters
    ----------
    path
        Space Ranger output folder.
    dataset_id
        Dataset id (prefix of element names); inferred by spatialdata-io when ``None``.
    patient, section
        Sample metadata written to the table (``obs`` columns and ``uns["genedml_sd"]``).
    **kwargs
        Passed to :func:`spatialdata_io.visium`, e.g. ``fullres_image_file=`` to include the full
        resolution H&E (recommended: 0.5 µm/px tiles need it).

    Returns
    -------
    The spatialdata-io object; every image has its µm/px recorded (55 µm spots), see
    :func:`genedml_sd.io.get_pixel_size`.
    """
    import pandas as pd
    from spatialdata_io import visium as _visium

    sdata = _visium(path, dataset_id=dataset_id, **kwargs)
    shapes_key = next(iter(sdata.shapes))
    record_pixel_sizes_from_spots(sdata, shapes_key, VISIUM_SPOT_DIAMETER_UM)
    info = {"technology": "visium", "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM, "sample": shapes_key}
    info["patient"] = str(patient) if patient is not None else shapes_key
    info["section"] = str(section) if section is not None else shapes_key
    for table in sdata.tables.values():
        table.uns[ATTRS_KEY] = {**info, "shapes_key": shapes_key}
        for key in ("patient", "section", "sample"):
            table.obs[key] = pd.Categorical([info[key]] * table.n_obs)
    return sdata
