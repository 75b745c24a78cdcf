"""Reader for HEST-1k samples (pyramidal TIFF + scanpy AnnData + metadata JSON)."""

from __future__ import annotations

import json
import logging
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._build import build_spot_sdata
from ._tiff import tiff_levels

if TYPE_CHECKING:
    import dask.array as da
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

# Spot geometry by technology, used when the metadata lacks ``spot_diameter`` (µm).
SPOT_DIAMETER_UM = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0, "legacy_st": 100.0}


def read_tiff_lazy(path: str | PathLike) -> da.Array:
    """Open the full-resolution level of a (pyramidal) TIFF as a lazy ``(y, x, c)`` dask array.

    Only the tiles a computation touches are decoded, so whole-slide images never enter memory. The
    array can be pickled (DataLoader workers and dask processes reopen the file), see
    :func:`~genedml_sd.io._tiff.tiff_levels`.
    """
    return tiff_levels(path)[0].transpose(1, 2, 0)


def hest(path: str | PathLike, sample_id: str) -> SpatialData:
    """Read one HEST-1k sample into SpatialData.

    Parameters
    ----------
    path
        Root of a (partial) HEST-1k download with sub-folders ``st/`` (``{sample_id}.h5ad``), ``wsis/``
        (``{sample_id}.tif``, pyramidal) and ``metadata/`` (``{sample_id}.json``).
    sample_id
        HEST sample id, e.g. ``"TENX95"``.

    Returns
    -------
    SpatialData with image ``f"{sample_id}_he"`` (read lazily from the TIFF), circles
    ``f"{sample_id}_spots"`` in full-resolution pixel coordinates (``obsm["spatial"]``), and table
    ``"table"`` with the raw counts. The pixel size comes from ``pixel_size_um_estimated`` in the
    metadata; the spot diameter from ``spot_diameter`` (µm) or the technology.
    """
    import anndata as ad

    root = Path(path)
    files = {
        "st": root / "st" / f"{sample_id}.h5ad",
        "wsi": root / "wsis" / f"{sample_id}.tif",
        "metadata": root / "metadata" / f"{sample_id}.json",
    }
    for kind, file in files.items():
        if not file.exists():
            raise FileNotFoundError(f"HEST sample {sample_id!r}: {kind} file {file} does not exist.")
    meta = json.loads(files["metadata"].read_text())
    um_per_px = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    if not um_per_px:
        raise ValueError(f"HEST metadata {files['metadata']} has no 'pixel_size_um_estimated'.")
    tech = str(meta.get("st_technology", "")).lower()
    diameter = meta.get("spot_diameter") or SPOT_DIAMETER_UM.get(tech)
    if not diameter:
        raise ValueError(
            f"HEST metadata {files['metadata']} has no 'spot_diameter' and the technology {tech!r} is unknown."
        )

    adata = ad.read_h5ad(files["st"])
    if "spatial" not in adata.obsm:
        raise KeyError(f"{files['st']} lacks obsm['spatial'] (spot centres in full-resolution pixels).")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    image = read_tiff_lazy(files["wsi"])
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"{files['wsi']} is not an RGB image (shape {image.shape}).")
    image = image[..., :3]

    keep = [c for c in ("array_row", "array_col", "in_tissue") if c in adata.obs]
    obs = pd.DataFrame({"barcode": adata.obs_names.astype(str), **{c: adata.obs[c].to_numpy() for c in keep}})
    obs.index = pd.Index([f"{sample_id}_{b}" for b in adata.obs_names.astype(str)])
    info = {
        "technology": tech or "unknown",
        "platform": tech or "unknown",
        "observation": "spot",
        "observation_um": float(diameter),
        "spot_diameter_um": float(diameter),
        "um_per_px_image": float(um_per_px),
        "source": "hest",
    }
    for key in ("patient", "organ", "oncotree_code", "species"):
        if meta.get(key) is not None:
            info[key] = str(meta[key])
    info.setdefault("patient", sample_id)
    info["section"] = sample_id
    return build_spot_sdata(
        image,
        um_per_px=float(um_per_px),
        spots_xy=xy,
        spot_radius=float(diameter) / 2 / float(um_per_px),
        counts=adata.X,
        obs=obs,
        var_names=pd.Index(adata.var_names.astype(str)),
        sample_id=sample_id,
        sample_info=info,
    )
