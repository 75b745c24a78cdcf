"""10x Genomics feature-barcode matrices (CellRanger v3+ HDF5) and pyramidal TIFFs, as the platforms write them.

HDF5 layout checked against the reader spatialdata-io 0.7.1 uses, :func:`scanpy.read_10x_h5` (scanpy 1.11,
``_read_v3_10x_h5``): ``/matrix`` with ``barcodes``, ``data``, ``indices``, ``indptr``, ``shape`` (n_features,
n_barcodes) and ``features/{id, name, feature_type, genome, _all_tag_keys}``, stored feature-major as in
CellRanger (CSC of features x barcodes, i.e. CSR of barcodes x features); file attributes ``library_ids``,
``chemistry_description``, ``software_version``, ``filetype`` and ``version`` as CellRanger / Space Ranger /
Xenium Onboard Analysis write them (spatialdata-io reads ``library_ids`` in ``_read_counts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp


def write_10x_h5(
    path: Path,
    counts: np.ndarray | sp.spmatrix,
    barcodes: Sequence[str],
    genes: Sequence[str],
    *,
    library_id: str | None = "library",
    feature_types: Sequence[str] | None = None,
    genome: str = "GRCh38",
    software: str = "spaceranger-3.0.0",
    chemistry: str = "Visium V2 Slide",
) -> None:
    """Write ``counts`` (n_barcodes x n_genes, integer) as a CellRanger v3 feature-barcode matrix."""
    import h5py

    x = sp.csr_matrix(counts)
    x.sort_indices()
    n_obs, n_var = x.shape
    ftypes = list(feature_types) if feature_types is not None else ["Gene Expression"] * n_var
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if library_id is not None:
            f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["chemistry_description"] = chemistry
        f.attrs["software_version"] = software
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]), compression="gzip")
        m.create_dataset("data", data=x.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=x.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=x.indptr.astype(np.int64), compression="gzip")
        m.create_dataset("shape", data=np.array([n_var, n_obs], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}".encode() for i in range(n_var)]))
        feat.create_dataset("name", data=np.array([g.encode() for g in genes]))
        feat.create_dataset("feature_type", data=np.array([t.encode() for t in ftypes]))
        feat.create_dataset("genome", data=np.array([genome.encode()] * n_var))


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    *,
    n_sub: int = 2,
    tile: int = 256,
    compression: str = "zlib",
    resolution_um: float | None = None,
    ome_um: float | None = None,
) -> list[np.ndarray]:
    """Write an (H, W, 3) uint8 image as a tiled TIFF with ``n_sub`` SubIFD levels (2x means); return the levels.

    ``resolution_um`` writes XResolution / YResolution in px per cm (ResolutionUnit 3); ``ome_um`` writes an
    OME-TIFF (the name should end in ``.ome.tif``) with PhysicalSizeX / PhysicalSizeY in µm.
    """
    import tifffile

    levels = [image]
    for _ in range(n_sub):
        a = levels[-1].astype(np.uint16)
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        levels.append(
            ((a[0:h:2, 0:w:2] + a[1:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 1:w:2] + 2) // 4).astype(np.uint8)
        )
    kw: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if compression == "zlib":
        kw["compressionargs"] = {"level": 1}
    first = dict(kw, subifds=n_sub)
    if resolution_um is not None:
        first.update(resolution=(1e4 / resolution_um, 1e4 / resolution_um), resolutionunit="CENTIMETER")
    if ome_um is not None:
        first["metadata"] = {
            "axes": "YXS",
            "PhysicalSizeX": ome_um,
            "PhysicalSizeY": ome_um,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm",
        }
    else:
        first["metadata"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome_um is not None) as tif:
        tif.write(levels[0], **first)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, **kw)
    return levels
