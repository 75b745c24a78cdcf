"""10x Visium (Space Ranger ``outs/``) through spatialdata-io, with the pixel size from the spot lattice.

Checked against spatialdata-io 0.7.1 (``spatialdata_io.readers.visium``, ``VisiumKeys``): ``spatial/`` holds
``tissue_positions.csv`` (Space Ranger 2+, with a header) or ``tissue_positions_list.csv`` (Space Ranger 1,
no header), ``scalefactors_json.json``, ``tissue_hires_image.png`` and ``tissue_lowres_image.png``; the counts
are ``(<library_id>_)filtered_feature_bc_matrix.h5`` (CellRanger v3 HDF5, read by :func:`scanpy.read_10x_h5`).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from genedml_sd._spatial import set_pixel_size

from ._assemble import assemble, sample_metadata
from ._lattice import VISIUM_STEP_UM, fit_lattice
from ._pyramid import extend_levels, multiscale_image
from ._tenx import (
    barcode_table,
    downscaled_image,
    find_counts_file,
    infer_dataset_id,
    outs_folder,
    read_json,
    relative_difference,
)
from ._tiff import image_levels_from_file
from ._wsi import resolve_pixel_size

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0
TOLERANCE = 0.05
"""Relative disagreement between two pixel-size estimates above which a warning is given."""


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


def _positions_file(root: Path, tissue_positions_file: str | PathLike | None) -> Path:
    if tissue_positions_file is not None:
        found = root / tissue_positions_file
        if not found.is_file():
            raise FileNotFoundError(f"Tissue positions file {found} does not exist.")
        return found
    for name in ("tissue_positions_list.csv", "tissue_positions.csv"):  # the order spatialdata-io 0.7.1 uses
        if (root / "spatial" / name).is_file():
            return root / "spatial" / name
    raise FileNotFoundError(
        f"No spatial/tissue_positions.csv (Space Ranger 2+) or spatial/tissue_positions_list.csv (Space Ranger 1) "
        f"in {root}."
    )


def _check_inside(xy: np.ndarray, shape_yx: tuple[int, int], scale: float, image: str, barcodes: pd.Index) -> None:
    """Raise if spot centres (full-resolution px) fall outside an image of ``shape_yx`` px at ``scale`` x fullres."""
    h, w = shape_yx
    px = xy * scale
    off = ~((px[:, 0] >= -0.5) & (px[:, 0] <= w + 0.5) & (px[:, 1] >= -0.5) & (px[:, 1] <= h + 0.5))
    if off.any():
        raise ValueError(
            f"{int(off.sum())} of {len(xy)} spots lie outside {image} ({w} x {h} px), e.g. {list(barcodes[off][:3])}; "
            "is it the image Space Ranger was run on (and are the scale factors its own)?"
        )


def visium(
    path: str | PathLike,
    *,
    fullres_image_file: str | PathLike | None = None,
    dataset_id: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    tissue_positions_file: str | PathLike | None = None,
    scalefactors_file: str | PathLike | None = None,
    um_per_px: float | None = None,
    patient: str | None = None,
    section: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    spot_pitch_um: float = VISIUM_SPOT_PITCH_UM,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Visium Space Ranger output folder, with µm/px derived from the spot lattice.

    Counts, spot positions and the hires / lowres images are read by :func:`spatialdata_io.visium`; the
    full-resolution H&E, when given, lazily with :func:`genedml_sd.io.wsi`'s reader. The pixel size comes
    from the spot array: an affine fit of the spots' pixel positions against their ``array_col`` /
    ``array_row`` (50 µm and 86.6 µm per step of the 100 µm hexagonal lattice) gives µm/px whatever the
    image's rotation or flip. It is cross-checked against ``spot_diameter_fullres`` / 55 µm of the scale
    factors, which Space Ranger does not always write as the physical spot diameter (a warning is given
    when they disagree by more than 5 %).

    Parameters
    ----------
    path
        The ``outs/`` folder (or the folder holding it).
    fullres_image_file
        The full-resolution H&E Space Ranger was run on (TIFF / BTF read lazily; JPEG / PNG decoded in memory).
        Recommended: the hires PNG (about 2,000 px) is far too coarse for 0.5 µm/px tiles.
    dataset_id
        Prefix of the element names. Default: the ``<library_id>_`` prefix of the counts file, else the
        ``library_ids`` attribute of the HDF5 matrix, else the folder name (the choice is logged).
    counts_file
        Counts matrix in ``path`` (CellRanger v3 HDF5).
    tissue_positions_file, scalefactors_file
        Paths relative to ``path`` when the files are not at their standard places under ``spatial/``.
    um_per_px
        Pixel size of the full-resolution frame (µm/px), overriding the lattice (a warning is given when it
        differs from the lattice by more than 5 %).
    patient, section
        Sample metadata (default: the dataset id).
    spot_diameter_um, spot_pitch_um
        Spot diameter and centre-to-centre distance in µm (55 and 100 for Visium).
    **kwargs
        Passed to :func:`spatialdata_io.visium` (e.g. ``imread_kwargs``).

    Returns
    -------
    SpatialData in the full-resolution pixel frame (coordinate system ``"global"``) with

    - image ``f"{dataset_id}_he"``: the full-resolution H&E (``Identity``), or without it the hires image
      (``Scale(1 / tissue_hires_scalef)``; the lowres one when there is no hires, with a warning), a
      multiscale ``(c, y, x)`` pyramid whose µm/px is recorded: full-resolution µm/px, divided by the
      image's scale factor for hires / lowres;
    - shapes ``f"{dataset_id}_spots"``: circles of the true 55 µm diameter at the spot centres;
    - table ``"table"``: raw counts (``int32`` CSR) annotating the spots (``region`` / ``spot_id``), barcodes
      in ``obs["barcode"]``, ``array_row`` / ``array_col`` / ``in_tissue``, and ``uns["genedml_sd"]`` with
      ``patient``, ``section``, ``platform="visium"``, ``observation="spot"``, ``observation_um`` and the
      pixel-size estimates (``um_per_px_lattice``, ``um_per_px_scalefactors``).

    Raises
    ------
    FileNotFoundError
        When the counts matrix, the tissue positions, the scale factors or every image is missing (naming
        the folder or file).
    ValueError
        When counted spots have no position, spots fall outside the image, or the counts are not raw counts.

    Notes
    -----
    File names and keys as spatialdata-io 0.7.1 reads them; tested on Space Ranger 1 and 2+ layouts written
    from real HER2ST pixels and counts (``gd.datasets.visium_layout``).
    """
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, Scale
    from spatialdata_io import visium as read_visium

    root = outs_folder(path, "spatial")
    counts_path, prefix = find_counts_file(root, counts_file)
    dataset_id = re.sub(r"[^0-9A-Za-z_.-]", "_", infer_dataset_id(root, counts_path, prefix, dataset_id))
    positions = _positions_file(root, tissue_positions_file)
    sf_path = root / scalefactors_file if scalefactors_file is not None else root / "spatial" / "scalefactors_json.json"
    sf = read_json(sf_path, ("spot_diameter_fullres",))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Converting `region_key")  # spatialdata-io's own table
        src = read_visium(
            root,
            dataset_id=dataset_id,
            counts_file=counts_file,
            tissue_positions_file=positions.relative_to(root) if positions.is_relative_to(root) else positions,
            scalefactors_file=sf_path.relative_to(root) if sf_path.is_relative_to(root) else sf_path,
            **kwargs,
        )
    table = src.tables["table"]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    lost = ~np.isfinite(xy).all(axis=1)
    if lost.any():
        raise ValueError(
            f"{int(lost.sum())} barcodes of {counts_path.name} have no row in {positions}, "
            f"e.g. {list(table.obs_names[lost][:3])}."
        )

    step = cast(tuple[float, float], tuple(s * spot_pitch_um / VISIUM_SPOT_PITCH_UM for s in VISIUM_STEP_UM))
    fit = fit_lattice(table.obs[["array_col", "array_row"]].to_numpy(np.float64), xy, step)
    um_sf = spot_diameter_um / float(sf["spot_diameter_fullres"])
    if relative_difference(um_sf, fit.um_per_px) > TOLERANCE:
        warnings.warn(
            f"Pixel size of {dataset_id!r}: the spot lattice ({spot_pitch_um:g} µm centre to centre, {fit.n} spots) "
            f"gives {fit.um_per_px:.4g} µm/px, but spot_diameter_fullres = {sf['spot_diameter_fullres']:g} px in "
            f"{sf_path} gives {um_sf:.4g} µm/px for {spot_diameter_um:g} µm spots "
            f"({relative_difference(um_sf, fit.um_per_px):.0%} apart); using the lattice.",
            UserWarning,
            stacklevel=2,
        )
    if fit.anisotropy > 1 + TOLERANCE:
        warnings.warn(
            f"The spot lattice of {dataset_id!r} is stretched in the image by {fit.anisotropy - 1:.0%} along one "
            "direction; the pixel size is the mean over both directions.",
            UserWarning,
            stacklevel=2,
        )
    um = fit.um_per_px
    if um_per_px is not None:
        if relative_difference(float(um_per_px), um) > TOLERANCE:
            warnings.warn(
                f"um_per_px={um_per_px:g} differs by {relative_difference(float(um_per_px), um):.0%} from the "
                f"{um:.4g} µm/px of the spot lattice of {dataset_id!r}; using the value passed.",
                UserWarning,
                stacklevel=2,
            )
        um = float(um_per_px)

    image_key, shapes_key = f"{dataset_id}_he", f"{dataset_id}_spots"
    if fullres_image_file is not None:
        levels, recorded = image_levels_from_file(Path(fullres_image_file))
        if recorded.um_per_px is not None:
            resolve_pixel_size(recorded, um, fullres_image_file, what="the full-resolution image")  # warns only
        _check_inside(xy, levels[0].shape[1:], 1.0, str(fullres_image_file), table.obs_names)
        transformation, image_um, source = Identity(), um, "fullres"
    else:
        levels, scalef, source = downscaled_image(src.images, dataset_id, root, sf_path)
        _check_inside(xy, levels[0].shape[1:], scalef, f"spatial/tissue_{source}_image.png", table.obs_names)
        transformation, image_um = Scale([1 / scalef, 1 / scalef], axes=("x", "y")), um / scalef
        logger.info(
            "%s: no full-resolution image passed; the H&E is the %s image at %.4g µm/px (pass fullres_image_file= "
            "for finer tiles)",
            dataset_id,
            source,
            image_um,
        )
    image = multiscale_image(extend_levels(levels), {"global": transformation})

    n = table.n_obs
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(n, spot_diameter_um / 2 / um),
        index=pd.RangeIndex(n),
        transformations={"global": Identity()},
    )
    counts = barcode_table(table, xy)
    info = sample_metadata(
        dataset_id,
        platform="visium",
        observation="spot",
        observation_um=spot_diameter_um,
        patient=patient,
        section=section,
        spot_diameter_um=float(spot_diameter_um),
        spot_pitch_um=float(spot_pitch_um),
        um_per_px_fullres=float(um),
        um_per_px_image=float(image_um),
        um_per_px_lattice=float(fit.um_per_px),
        um_per_px_scalefactors=float(um_sf),
        image_source=source,
    )
    return assemble(
        image_key=image_key,
        image=image,
        um_per_px=image_um,
        shapes_key=shapes_key,
        shapes=shapes,
        table=counts,
        instance_key="spot_id",
        info=info,
    )
