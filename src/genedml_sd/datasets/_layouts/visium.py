"""A Space Ranger Visium ``outs/`` folder written from a real HER2ST section.

Files and keys checked against spatialdata-io 0.7.1 (``readers/visium.py``, ``VisiumKeys``):
``filtered_feature_bc_matrix.h5`` (optionally ``<library_id>_`` prefixed), ``spatial/tissue_positions.csv``
(Space Ranger 2+, header ``barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres``) or
``spatial/tissue_positions_list.csv`` (Space Ranger 1, the same columns without a header),
``spatial/scalefactors_json.json`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``,
``fiducial_diameter_fullres``, ``regist_target_img_scalef``), ``spatial/tissue_hires_image.png`` (2,000 px on
the long side) and ``spatial/tissue_lowres_image.png`` (600 px). The full-resolution H&E is a tiled TIFF beside
``outs/`` (Space Ranger takes it as input and does not copy it).

Geometry: the 78 x 128 hexagonal array (``array_col`` parity = ``array_row`` parity), 100 µm centre to centre
(50 µm per column step, 86.6 µm per row step), slightly rotated in the image; spots within 100 µm of a HER2ST
spot are under tissue and get that spot's counts thinned to the 55 µm spot's area (binomial, p = 0.3025).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from .her2st import Source, barcodes, resize
from .tenx import write_10x_h5, write_pyramid_tiff


@dataclass
class VisiumTruth:
    """What a layout was written from."""

    outs: Path
    fullres: Path
    um_per_px: float
    hires_scalef: float
    lowres_scalef: float
    positions: pd.DataFrame  # all spots of the array inside the image, indexed by barcode
    counts: np.ndarray  # in-tissue spots x genes, rows in positions[in_tissue == 1] order
    genes: list[str]
    library_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def hex_lattice(source: Source, um_per_px: float, angle_deg: float, rows: int = 78, cols: int = 128) -> pd.DataFrame:
    """Visium spots over the image: array indices and full-resolution pixel centres (x = col, y = row)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    keep = (c % 2) == (r % 2)
    r, c = r[keep], c[keep]
    u = np.column_stack([c * 50.0, r * 50.0 * math.sqrt(3)])
    u -= u.mean(axis=0)
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    h, w = source.image.shape[:2]
    xy = u @ rot.T / um_per_px + np.array([w / 2, h / 2])
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    return pd.DataFrame({"array_row": r[inside], "array_col": c[inside], "x": xy[inside, 0], "y": xy[inside, 1]})


def write_visium(
    root: Path,
    source: Source,
    *,
    spaceranger: int = 2,
    library_id: str | None = "HER2ST_B4_visium",
    counts_prefix: str | None = None,
    spot_diameter_factor: float = 1.0,
    angle_deg: float = 1.5,
    fullres: bool = True,
    seed: int = 0,
) -> VisiumTruth:
    """Write ``root/outs`` (+ ``root/fullres.tif``, the H&E as a tiled TIFF, when ``fullres``) as Space Ranger does.

    ``library_id=None`` writes no ``library_ids`` attribute; ``counts_prefix`` names the counts file
    ``<counts_prefix>_filtered_feature_bc_matrix.h5``; ``spaceranger=1`` writes ``tissue_positions_list.csv``.

    ``spot_diameter_factor`` scales ``spot_diameter_fullres`` away from the true 55 µm (Space Ranger 3 CytAssist
    outputs write it about 27 % larger than the physical spot, which made µm/px 21 % off).
    """
    rng = np.random.default_rng(seed)
    um = source.um_per_px
    spots = hex_lattice(source, um, angle_deg)
    d = np.linalg.norm(spots[["x", "y"]].to_numpy()[:, None, :] - source.spots_xy[None], axis=2)
    nearest, dist_um = d.argmin(axis=1), d.min(axis=1) * um
    spots["in_tissue"] = (dist_um < 100.0).astype(int)
    spots.index = pd.Index(barcodes(len(spots)), name="barcode")
    # Space Ranger 1/2 write integer pixel positions
    spots["pxl_row_in_fullres"] = np.round(spots["y"]).astype(int)
    spots["pxl_col_in_fullres"] = np.round(spots["x"]).astype(int)
    tissue = spots[spots["in_tissue"] == 1]
    counts = rng.binomial(source.counts[nearest[spots["in_tissue"].to_numpy() == 1]], (55.0 / 100.0) ** 2)

    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    name = f"{counts_prefix}_filtered_feature_bc_matrix.h5" if counts_prefix else "filtered_feature_bc_matrix.h5"
    write_10x_h5(outs / name, counts, list(tissue.index), source.genes, library_id=library_id)
    cols = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    if spaceranger >= 2:
        spots[cols].to_csv(outs / "spatial" / "tissue_positions.csv", header=True)
    else:
        spots[cols].to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False)

    h, w = source.image.shape[:2]
    hires_scalef, lowres_scalef = 2000 / max(h, w), 600 / max(h, w)
    Image.fromarray(resize(source.image, hires_scalef)).save(
        outs / "spatial" / "tissue_hires_image.png", compress_level=1
    )
    Image.fromarray(resize(source.image, lowres_scalef)).save(
        outs / "spatial" / "tissue_lowres_image.png", compress_level=1
    )
    spot_px = 55.0 / um
    scalefactors = {
        "regist_target_img_scalef": hires_scalef,
        "tissue_hires_scalef": hires_scalef,
        "tissue_lowres_scalef": lowres_scalef,
        "fiducial_diameter_fullres": spot_px * spot_diameter_factor * 65 / 55,
        "spot_diameter_fullres": spot_px * spot_diameter_factor,
    }
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=4))
    if fullres:
        write_pyramid_tiff(root / "fullres.tif", source.image, n_sub=2, tile=512)
    return VisiumTruth(
        outs=outs,
        fullres=root / "fullres.tif",
        um_per_px=um,
        hires_scalef=hires_scalef,
        lowres_scalef=lowres_scalef,
        positions=spots,
        counts=counts,
        genes=list(source.genes),
        library_id=library_id,
        extra={"scalefactors": scalefactors},
    )
