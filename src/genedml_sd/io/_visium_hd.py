"""10x Visium HD (Space Ranger ``outs/`` with ``binned_outputs/``) through spatialdata-io, bins as true squares.

Checked against spatialdata-io 0.7.1 (``spatialdata_io.readers.visium_hd``, ``VisiumHDKeys``): ``outs/`` holds
``(<dataset_id>_)feature_slice.h5`` (its ``metadata_json`` attribute is read), ``spatial/tissue_hires_image.png``
/ ``tissue_lowres_image.png``, and per bin size ``binned_outputs/square_XXXum/`` with
``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet`` (``barcode, in_tissue, array_row,
array_col, pxl_row_in_fullres, pxl_col_in_fullres``) and ``spatial/scalefactors_json.json`` (``bin_size_um``,
``microns_per_pixel``, ``spot_diameter_fullres``).
"""

from __future__ import annotations

import logging
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._assemble import assemble, sample_metadata
from ._lattice import fit_lattice, square_bins
from ._pyramid import extend_levels, multiscale_image
from ._tenx import (
    barcode_table,
    downscaled_image,
    folder_id,
    h5_library_id,
    outs_folder,
    read_json,
    relative_difference,
)
from ._tiff import image_levels_from_file
from ._wsi import resolve_pixel_size

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

LATTICE_TOLERANCE = 0.05
"""Relative disagreement between the bin lattice and ``microns_per_pixel`` above which reading fails."""
_QUIET = (
    "No full resolution image found",
    "No image path found containing the",
    "Converting `region_key",
    "`load_segmentations_only` default",
)


def _bin_folders(root: Path) -> dict[int, Path]:
    base = root / "binned_outputs"
    if not base.is_dir():
        raise FileNotFoundError(f"{root} has no binned_outputs/ folder; is it a Visium HD Space Ranger outs/ folder?")
    found = {}
    for sub in sorted(base.iterdir()):
        match = re.fullmatch(r"square_(\d{3})um", sub.name)
        if sub.is_dir() and match:
            found[int(match.group(1))] = sub
    return found


def _dataset_ids(root: Path, counts: Path, dataset_id: str | None) -> tuple[str, str | None]:
    """Our dataset id, and the one spatialdata-io must be given to find ``(<id>_)feature_slice.h5``."""
    if (root / "feature_slice.h5").is_file():
        reader_id = None
    else:
        prefixed = sorted(root.glob("*_feature_slice.h5"))
        if len(prefixed) != 1:
            raise FileNotFoundError(
                f"{root} has no feature_slice.h5 (or exactly one '<dataset_id>_feature_slice.h5'), which "
                f"spatialdata-io's Visium HD reader needs; found {[p.name for p in prefixed]}."
            )
        reader_id = prefixed[0].name.removesuffix("_feature_slice.h5")
    if dataset_id is None:
        if reader_id:
            dataset_id, how = reader_id, "the feature_slice.h5 file name"
        elif lib := h5_library_id(counts):
            dataset_id, how = lib, f"the 'library_ids' attribute of {counts}"
        else:
            dataset_id, how = folder_id(root), "the folder name"
        logger.info("Dataset id %r from %s", dataset_id, how)
    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(dataset_id)), reader_id


def _check_scalefactors(path: Path, bin_size: int, sf: dict[str, Any]) -> None:
    if float(sf["bin_size_um"]) != float(bin_size):
        raise ValueError(
            f"{path} says bin_size_um = {sf['bin_size_um']:g}, but its folder is square_{bin_size:03d}um; the "
            "scale factors belong to another bin size."
        )
    implied = float(sf["bin_size_um"]) / float(sf["spot_diameter_fullres"])
    if not np.isclose(implied, float(sf["microns_per_pixel"])):  # the check spatialdata-io asserts
        raise ValueError(
            f"{path}: bins of {sf['bin_size_um']:g} µm and spot_diameter_fullres = {sf['spot_diameter_fullres']:g} "
            f"px imply {implied:.5g} µm/px, but microns_per_pixel = {sf['microns_per_pixel']:.5g}; the bin size "
            "does not match the scale factors."
        )


def visium_hd(
    path: str | PathLike,
    *,
    bin_size: int = 8,
    fullres_image_file: str | PathLike | None = None,
    dataset_id: str | None = None,
    filtered_counts_file: bool = True,
    patient: str | None = None,
    section: str | None = None,
    **kwargs: Any,
) -> SpatialData:
    """Read one bin size of a 10x Visium HD Space Ranger output, bins as squares of their physical size.

    Counts and bin positions are read by :func:`spatialdata_io.visium_hd`; the full-resolution H&E, when
    given, lazily (see :func:`genedml_sd.io.wsi`). The pixel size is ``microns_per_pixel`` of the bin's
    ``spatial/scalefactors_json.json``; it is checked against the folder's bin size, against
    ``spot_diameter_fullres`` and against the bin lattice (an affine fit of the bins' pixel positions on
    ``array_col`` / ``array_row`` x bin size). Each bin is a square polygon of ``bin_size`` µm oriented along
    the fitted lattice (the array may be rotated in the microscope image).

    Parameters
    ----------
    path
        The ``outs/`` folder (or the folder holding it).
    bin_size
        Bin side in µm; ``binned_outputs/square_{bin_size:03d}um/`` must exist (2, 8 and 16 in Space Ranger).
    fullres_image_file
        The microscope H&E Space Ranger was run on (lazy for TIFF). Default: the one file of
        ``microscope_image/`` if present (where spatialdata-io looks), else the hires PNG.
    dataset_id
        Prefix of the element names. Default: the ``<id>_feature_slice.h5`` prefix, else the
        ``library_ids`` attribute of the counts matrix, else the folder name (logged).
    filtered_counts_file
        Read ``filtered_feature_bc_matrix.h5`` (bins under tissue) rather than ``raw_feature_bc_matrix.h5``.
    patient, section
        Sample metadata (default: the dataset id).
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd` (e.g. ``gex_only=True``).

    Returns
    -------
    SpatialData in the full-resolution pixel frame (``"global"``) with image ``f"{dataset_id}_he"``
    (multiscale, full resolution or hires with ``Scale(1 / tissue_hires_scalef)``, µm/px recorded), shapes
    ``f"{dataset_id}_square_{bin_size:03d}um"`` (square polygons) and table ``"table"``: raw counts as
    ``int32`` CSR (never densified), annotating the bins (``region`` / ``bin_id``), barcodes in
    ``obs["barcode"]``, ``array_row`` / ``array_col``, bin centres in ``obsm["spatial"]``, and
    ``uns["genedml_sd"]`` with ``platform="visium_hd"``, ``observation="bin"``, ``observation_um=bin_size``.

    Raises
    ------
    FileNotFoundError
        No ``binned_outputs/``, no feature slice file, or no image at all.
    ValueError
        The bin size is not present (the message lists those present), or the bins' size does not match the
        scale factors or their lattice.

    Notes
    -----
    File names and keys as spatialdata-io 0.7.1 reads them (``gd.datasets.visium_hd_layout`` writes the layout).
    """
    from geopandas import GeoDataFrame
    from shapely import polygons
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, Scale
    from spatialdata_io import visium_hd as read_visium_hd

    root = outs_folder(path, "binned_outputs")
    folders = _bin_folders(root)
    if int(bin_size) not in folders:
        raise ValueError(
            f"Bin size {bin_size} µm is not in {root / 'binned_outputs'}: it holds "
            f"{[f.name for f in folders.values()]} (bin sizes {sorted(folders)} µm)."
        )
    folder = folders[int(bin_size)]
    counts_path = folder / ("filtered_feature_bc_matrix.h5" if filtered_counts_file else "raw_feature_bc_matrix.h5")
    if not counts_path.is_file():
        raise FileNotFoundError(f"Counts matrix {counts_path} does not exist.")
    sf_path = folder / "spatial" / "scalefactors_json.json"
    sf = read_json(sf_path, ("bin_size_um", "microns_per_pixel", "spot_diameter_fullres"))
    _check_scalefactors(sf_path, int(bin_size), sf)
    um = float(sf["microns_per_pixel"])
    dataset_id, reader_id = _dataset_ids(root, counts_path, dataset_id)
    reader_id = reader_id or dataset_id  # spatialdata-io names its elements after it

    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
        src = read_visium_hd(
            root,
            dataset_id=reader_id,
            bin_size=int(bin_size),
            filtered_counts_file=filtered_counts_file,
            load_segmentations_only=False,
            bins_as_squares=False,
            annotate_table_by_labels=False,
            **kwargs,
        )
    table = src.tables[folder.name]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    fit = fit_lattice(table.obs[["array_col", "array_row"]].to_numpy(np.float64), xy, (bin_size, bin_size))
    if relative_difference(fit.um_per_px, um) > LATTICE_TOLERANCE:
        raise ValueError(
            f"The {bin_size} µm bins of {folder} are {1 / fit.um_per_px * bin_size:.4g} px apart in "
            f"tissue_positions.parquet, i.e. {fit.um_per_px:.4g} µm/px, but {sf_path} says microns_per_pixel = "
            f"{um:.4g}: the bins' size does not match the scale factors."
        )

    image_key = f"{dataset_id}_he"
    if fullres_image_file is None and (root / "microscope_image").is_dir():
        files = sorted(p for p in (root / "microscope_image").iterdir() if p.is_file())
        fullres_image_file = files[0] if len(files) == 1 else None
    if fullres_image_file is not None:
        levels, recorded = image_levels_from_file(Path(fullres_image_file))
        if recorded.um_per_px is not None:
            resolve_pixel_size(recorded, um, fullres_image_file, what="the full-resolution image")  # warns only
        transformation, image_um, source = Identity(), um, "fullres"
    else:
        levels, scalef, source = downscaled_image(src.images, reader_id, root, sf_path)
        transformation, image_um = Scale([1 / scalef, 1 / scalef], axes=("x", "y")), um / scalef
        logger.info("%s: no full-resolution image; the H&E is the %s image at %.4g µm/px", dataset_id, source, image_um)
    image = multiscale_image(extend_levels(levels), {"global": transformation})

    # squares of the true bin size, oriented along the lattice (its matrix rescaled to exactly 1 / um px per µm)
    scale = (1.0 / um) / np.sqrt(abs(np.linalg.det(fit.px_per_um)))
    oriented = type(fit)(um, fit.px_per_um * scale, fit.anisotropy, fit.rms_px, fit.n)
    n = table.n_obs
    geometry = polygons(square_bins(xy, oriented, float(bin_size)))
    shapes = ShapesModel.parse(
        GeoDataFrame(geometry=geometry, index=pd.RangeIndex(n)), transformations={"global": Identity()}
    )
    counts = barcode_table(table, xy)
    info = sample_metadata(
        dataset_id,
        platform="visium_hd",
        observation="bin",
        observation_um=float(bin_size),
        patient=patient,
        section=section,
        bin_size_um=float(bin_size),
        um_per_px_fullres=um,
        um_per_px_image=float(image_um),
        um_per_px_lattice=float(fit.um_per_px),
        image_source=source,
    )
    return assemble(
        image_key=image_key,
        image=image,
        um_per_px=image_um,
        shapes_key=f"{dataset_id}_{folder.name}",
        shapes=shapes,
        table=counts,
        instance_key="bin_id",
        info=info,
    )
