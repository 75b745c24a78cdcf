"""10x Xenium with a post-stained H&E: cells as observations, the H&E placed by its alignment matrix.

Checked against spatialdata-io 0.7.1 (``spatialdata_io.readers.xenium``: ``xenium``, ``xenium_aligned_image``,
``XeniumKeys``): the output folder holds ``experiment.xenium``, ``cells.zarr.zip``, ``cells.parquet``,
``cell_feature_matrix.h5``, ``cell_boundaries.parquet`` (and ``nucleus_boundaries.parquet``,
``morphology_focus/``, ``transcripts.parquet``, read only when asked for); an aligned H&E is
``<name>he_image.ome.tif`` with its Xenium Explorer alignment ``<name>he_imagealignment.csv``, a 3 x 3 affine
matrix from H&E pixels to morphology pixels (``pixel_size`` µm each, 0.2125 on Xenium).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd._spatial import image_levels

from ._assemble import assemble, sample_metadata
from ._pyramid import extend_levels, multiscale_image
from ._tenx import folder_id, outs_folder, relative_difference
from ._tiff import image_levels_from_file
from ._wsi import PIXEL_SIZE_TOLERANCE

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

HE_SUFFIX = "he_image.ome.tif"
READER_DEFAULTS = {
    "cells_boundaries": True,
    "nucleus_boundaries": False,
    "cells_as_circles": False,
    "cells_labels": False,
    "nucleus_labels": False,
    "transcripts": False,
    "morphology_mip": False,
    "morphology_focus": False,
    "aligned_images": False,
    "cells_table": True,
}
"""Elements :func:`spatialdata_io.xenium` reads by default here (override with keyword arguments)."""


def _he_and_alignment(root: Path, he_image: Any, alignment: Any) -> tuple[Path, Path | np.ndarray]:
    if he_image is None:
        found = sorted(p for p in root.glob(f"*{HE_SUFFIX}") if not p.name.startswith("._"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{root} holds {len(found)} post-stained H&E files '*{HE_SUFFIX}' ({[p.name for p in found]}); pass "
                "he_image= (and alignment=). The morphology (DAPI) image is not an H&E."
            )
        he_image = found[0]
    he_image = Path(he_image)
    if not he_image.is_file():
        raise FileNotFoundError(f"H&E image {he_image} does not exist.")
    if alignment is None:
        expected = he_image.with_name(he_image.name.replace(".ome.tif", "alignment.csv"))
        if not expected.is_file() or expected == he_image:
            raise ValueError(
                f"The H&E {he_image} has no alignment: {expected.name} (the 3 x 3 matrix Xenium Explorer's image "
                "alignment exports, H&E pixels -> morphology pixels) is missing. Pass alignment= with its path or "
                "the matrix; the H&E cannot be placed on the cells without it."
            )
        alignment = expected
    if isinstance(alignment, str | PathLike):
        alignment = Path(alignment)
        if not alignment.is_file():
            raise FileNotFoundError(f"Alignment file {alignment} does not exist.")
    return he_image, alignment


def _affine(alignment: Path | np.ndarray, he_image: Path) -> np.ndarray:
    what = alignment if isinstance(alignment, Path) else "the alignment matrix passed"
    if isinstance(alignment, Path):
        try:
            matrix = pd.read_csv(alignment, header=None).to_numpy(dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"Alignment file {alignment} is not a 3 x 3 matrix of numbers: {e}") from None
    else:
        matrix = np.asarray(alignment, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"{what} must be a finite 3 x 3 matrix (H&E px -> morphology px), got shape {matrix.shape}.")
    if not np.allclose(matrix[2], [0, 0, 1]) or abs(np.linalg.det(matrix[:2, :2])) == 0:
        raise ValueError(f"{what} is not an invertible affine matrix (last row must be 0 0 1): {matrix.tolist()}.")
    return matrix


def _dataset_id(root: Path, specs: dict[str, Any], dataset_id: str | None) -> str:
    if dataset_id is None:
        if specs.get("region_name"):
            dataset_id, how = str(specs["region_name"]), "'region_name' of experiment.xenium"
        else:
            dataset_id, how = folder_id(root), "the folder name"
        logger.info("Dataset id %r from %s", dataset_id, how)
    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(dataset_id))


def xenium(
    path: str | PathLike,
    *,
    he_image: str | PathLike | None = None,
    alignment: str | PathLike | np.ndarray | None = None,
    dataset_id: str | None = None,
    patient: str | None = None,
    section: str | None = None,
    boundaries: bool = False,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Xenium output with its post-stained H&E; the cells are the observations.

    Cells, counts and boundaries are read by :func:`spatialdata_io.xenium`; the H&E's transformation by
    :func:`spatialdata_io.xenium_aligned_image` from the alignment CSV, and its pixels lazily from the
    OME-TIFF pyramid (see :func:`genedml_sd.io.wsi`). The H&E's pixel size follows from the alignment:
    ``pixel_size * sqrt(|det A|)`` µm/px (``A`` the 2 x 2 part, ``pixel_size`` from ``experiment.xenium``);
    a warning is given when the OME-TIFF records a value more than 5 % away.

    Parameters
    ----------
    path
        The Xenium output folder (or the folder holding ``outs/``).
    he_image
        The post-stained H&E (OME-TIFF). Default: the one ``*he_image.ome.tif`` in ``path``.
    alignment
        Its alignment: a CSV file (3 x 3, no header) or the matrix, from H&E pixels to morphology pixels.
        Default: ``*he_imagealignment.csv`` beside the H&E (the name spatialdata-io pairs).
    dataset_id
        Prefix of the element names (default: ``region_name`` of ``experiment.xenium``, else the folder name).
    patient, section
        Sample metadata (default: the dataset id).
    boundaries
        Also keep the cell boundary polygons (and nucleus ones, with ``nucleus_boundaries=True``) as shapes
        elements ``f"{dataset_id}_cell_boundaries"`` / ``..._nucleus_boundaries``. Off by default, so that the
        cells are the only shapes element (functions infer it).
    **kwargs
        Passed to :func:`spatialdata_io.xenium`; by default only the cells table and cell boundaries (for
        the cell sizes) are read (``nucleus_boundaries``, ``cells_labels``, ``transcripts``,
        ``morphology_focus``... are ``False``). Images, labels and points asked for are kept under their
        spatialdata-io names.

    Returns
    -------
    SpatialData in morphology pixels (``"global"``) with image ``f"{dataset_id}_he"`` (multiscale, affine to
    ``"global"``, µm/px recorded), shapes ``f"{dataset_id}_cells"``: circles at the cell centroids (µm, scaled
    to ``"global"``) of the cells' true size (radius ``sqrt(area / pi)`` of their boundary polygon; of
    ``cell_area`` for cells without one), with ``boundaries=True`` the polygons, and table
    ``"table"``: raw gene counts (``int32`` CSR) annotating the circles (``region`` / ``cell_index``), Xenium
    ids in ``obs["cell_id"]``, centroids in ``obsm["spatial"]`` (µm), ``uns["genedml_sd"]`` with
    ``platform="xenium"``, ``observation="cell"`` and ``observation_um`` the median cell diameter.

    Raises
    ------
    FileNotFoundError
        No ``experiment.xenium``, no H&E, or a named file missing.
    ValueError
        An H&E without alignment, an alignment that is not an invertible 3 x 3 affine, or an H&E whose pixels
        do not match what spatialdata-io reads.

    Notes
    -----
    Files and keys as spatialdata-io 0.7.1 reads them for Xenium Onboard Analysis 2.x (``cells.zarr.zip`` with
    ``polygon_sets``; ``gd.datasets.xenium_layout`` writes the layout).
    """
    from anndata import AnnData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Affine, Scale, get_transformation
    from spatialdata_io import xenium as read_xenium
    from spatialdata_io import xenium_aligned_image

    root = outs_folder(path, "experiment.xenium")
    specs_path = root / "experiment.xenium"
    if not specs_path.is_file():
        raise FileNotFoundError(f"{root} has no experiment.xenium; is it a Xenium output folder?")
    specs = json.loads(specs_path.read_text())
    pixel_size = float(specs.get("pixel_size", 0) or 0)
    if not pixel_size > 0:
        raise ValueError(f"{specs_path} has no positive 'pixel_size' (µm per morphology pixel).")
    he_path, alignment = _he_and_alignment(root, he_image, alignment)
    matrix = _affine(alignment, he_path)
    dataset_id = _dataset_id(root, specs, dataset_id)

    levels, recorded = image_levels_from_file(he_path)
    if isinstance(alignment, Path):
        aligned = xenium_aligned_image(he_path, alignment)  # lazy: its transformation and axes
        transformation = get_transformation(aligned, "global")
        shape = tuple(image_levels(aligned)[0].shape)
        if shape != tuple(levels[0].shape):
            raise ValueError(
                f"{he_path}: spatialdata-io reads it as {shape} (c, y, x) but its pyramid's full resolution is "
                f"{tuple(levels[0].shape)}; pass alignment as a matrix to skip spatialdata-io's axis guess."
            )
    else:
        transformation = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    um_he = pixel_size * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    if recorded.um_per_px is not None:
        file_um = float(np.mean(recorded.um_per_px))
        if relative_difference(file_um, um_he) > PIXEL_SIZE_TOLERANCE:
            warnings.warn(
                f"{he_path} records {file_um:.4g} µm/px ({recorded.source}), but its alignment gives {um_he:.4g} "
                f"µm/px ({relative_difference(file_um, um_he):.0%} apart); using the alignment.",
                UserWarning,
                stacklevel=2,
            )
    image = multiscale_image(extend_levels(levels), {"global": transformation})

    options = {**READER_DEFAULTS, **kwargs}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Converting `region_key")
        warnings.filterwarnings("ignore", message=".*The table is annotating")  # its cell_labels, not read here
        src = read_xenium(root, **options)
    if "table" not in src.tables:
        raise ValueError(f"spatialdata-io read no cells table from {root}; do not pass cells_table=False.")
    table = src.tables["table"]
    ids = table.obs_names.astype(str)
    xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)
    area = pd.Series(np.nan, index=ids)
    polys = src.shapes.get("cell_boundaries")
    if polys is not None:
        polygon_area = pd.Series(polys.geometry.area.to_numpy(), index=polys.index.astype(str))
        area = polygon_area.reindex(ids)
    if "cell_area" in table.obs:
        missing = area.isna().to_numpy()
        area[missing] = table.obs["cell_area"].to_numpy(np.float64)[missing]
    if area.isna().any() or (area <= 0).any():
        bad = list(area.index[(area.isna() | (area <= 0)).to_numpy()][:3])
        raise ValueError(f"Cells of {root} without a boundary polygon or a positive cell_area, e.g. {bad}.")
    radius_um = np.sqrt(area.to_numpy() / np.pi)

    to_global = Scale([1 / pixel_size, 1 / pixel_size], axes=("x", "y"))
    n = len(ids)
    circles = ShapesModel.parse(
        xy_um, geometry=0, radius=radius_um, index=pd.RangeIndex(n), transformations={"global": to_global}
    )
    obs = table.obs.drop(columns=[c for c in ("region", "cell_labels") if c in table.obs]).copy()
    obs["cell_id"] = ids.to_numpy()
    obs.index = pd.Index(ids)
    counts = AnnData(X=table.X, obs=obs, var=table.var.copy(), obsm={"spatial": xy_um})
    extra = {}
    for name in ("cell_boundaries", "nucleus_boundaries"):
        if boundaries and name in src.shapes:
            extra[f"{dataset_id}_{name}"] = src.shapes[name]
    info = sample_metadata(
        dataset_id,
        platform="xenium",
        observation="cell",
        observation_um=float(2 * np.median(radius_um)),
        patient=patient,
        section=section,
        pixel_size_um=pixel_size,
        um_per_px_image=um_he,
        he_image=str(he_path),
    )
    sdata = assemble(
        image_key=f"{dataset_id}_he",
        image=image,
        um_per_px=um_he,
        shapes_key=f"{dataset_id}_cells",
        shapes=circles,
        table=counts,
        instance_key="cell_index",
        info=info,
        extra_shapes=extra,
    )
    for kind in ("images", "labels", "points"):
        for name, element in getattr(src, kind).items():
            getattr(sdata, kind)[name] = element
    return sdata
