"""A Space Ranger Visium HD ``outs/`` folder (8 and 16 µm bins) written from a real HER2ST section.

Files and keys checked against spatialdata-io 0.7.1 (``readers/visium_hd.py``, ``VisiumHDKeys``):
``feature_slice.h5`` whose attribute ``metadata_json`` holds ``hd_layout_json`` with ``file_format`` "1.0" (the
reader opens it for the dataset id and layout; its datasets are not read and are omitted here),
``spatial/tissue_hires_image.png`` and ``tissue_lowres_image.png``, and per bin size
``binned_outputs/square_XXXum/filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet`` with exactly
the columns ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres`` and
``spatial/scalefactors_json.json`` with ``bin_size_um``, ``microns_per_pixel`` and ``spot_diameter_fullres``
(= bin size in full-resolution px; the reader asserts ``bin_size_um / spot_diameter_fullres ==
microns_per_pixel``). Barcodes are ``s_008um_<row>_<col>-1`` as Space Ranger writes them.

Geometry: a 1,100 px (1.5 mm) square crop of the section is the microscope image; the bin array is rotated by
1 degree in it. Bins whose centre lies under a HER2ST spot (within 50 µm of its centre) are under tissue and
share that spot's counts (multinomial, equal probabilities), so the 8 µm bins under a spot add up to its
counts; 16 µm bins are sums of 2 x 2 8 µm bins, as Space Ranger bins them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .her2st import Source, resize
from .tenx import write_10x_h5, write_pyramid_tiff

CROP_PX = 1100
ANGLE_DEG = 1.0


@dataclass
class VisiumHDTruth:
    """What a layout was written from."""

    outs: Path
    fullres: Path
    um_per_px: float
    hires_scalef: float
    crop_origin: tuple[int, int]
    # bin size -> DataFrame of all bins in the image (barcode index, in_tissue, array_*, x, y, spot)
    bins: dict[int, pd.DataFrame]
    # bin size -> (n_in_tissue, n_genes) int counts, rows in bins[size][in_tissue == 1] order
    counts: dict[int, np.ndarray]
    spot_counts: np.ndarray  # the HER2ST spots in the crop, (n_spots_crop, n_genes)
    genes: list[str]


def _grid(n: int, bin_um: float, um: float, origin_px: np.ndarray) -> pd.DataFrame:
    grid_rows, grid_cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rows, cols = grid_rows.ravel(), grid_cols.ravel()
    side = n * bin_um
    u = np.column_stack([(cols + 0.5) * bin_um - side / 2, (rows + 0.5) * bin_um - side / 2])
    t = math.radians(ANGLE_DEG)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    xy = u @ rot.T / um + origin_px
    return pd.DataFrame({"array_row": rows, "array_col": cols, "x": xy[:, 0], "y": xy[:, 1]})


def write_visium_hd(root: Path, source: Source, *, library_id: str = "HER2ST_B4_hd", seed: int = 0) -> VisiumHDTruth:
    """Write ``root/outs`` (+ ``root/microscope.tif``, the full-resolution crop) with 8 and 16 µm bins."""
    rng = np.random.default_rng(seed)
    um = source.um_per_px
    centre = np.median(source.spots_xy, axis=0).round().astype(int)
    x0, y0 = centre - CROP_PX // 2
    image = source.image[y0 : y0 + CROP_PX, x0 : x0 + CROP_PX]
    spots = source.spots_xy - np.array([x0, y0])
    in_crop = ((spots >= 0) & (spots < CROP_PX)).all(axis=1)
    spots, spot_counts = spots[in_crop], source.counts[in_crop]

    n8 = int(CROP_PX * um / 8 / 2) * 2  # even, so that 16 µm bins are 2 x 2 8 µm bins
    mid = np.array([CROP_PX / 2, CROP_PX / 2])
    g8 = _grid(n8, 8.0, um, mid)
    d = np.linalg.norm(g8[["x", "y"]].to_numpy()[:, None] - spots[None], axis=2)
    g8["spot"] = np.where(d.min(axis=1) * um < 50.0, d.argmin(axis=1), -1)
    x8 = np.zeros((len(g8), len(source.genes)), dtype=np.int64)
    for s in range(len(spots)):
        members = np.flatnonzero(g8["spot"].to_numpy() == s)
        if len(members):
            p = np.full(len(members), 1.0 / len(members))
            x8[members] = np.stack([rng.multinomial(c, p) for c in spot_counts[s]], axis=1)
    g16 = _grid(n8 // 2, 16.0, um, mid)
    parent = (g8["array_row"].to_numpy() // 2) * (n8 // 2) + g8["array_col"].to_numpy() // 2
    x16 = np.zeros((len(g16), len(source.genes)), dtype=np.int64)
    np.add.at(x16, parent, x8)
    tissue16 = np.zeros(len(g16), dtype=bool)
    tissue16[parent[g8["spot"].to_numpy() >= 0]] = True
    g16["spot"] = np.where(tissue16, 0, -1)

    outs = root / "outs"
    hires_scalef, lowres_scalef = 0.5, 0.2
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    hires, lowres = resize(image, hires_scalef), resize(image, lowres_scalef)
    for folder in [outs / "spatial"]:
        Image.fromarray(hires).save(folder / "tissue_hires_image.png", compress_level=1)
        Image.fromarray(lowres).save(folder / "tissue_lowres_image.png", compress_level=1)
    import h5py

    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1], "num_row": n8 * 4, "num_col": n8 * 4}
    with h5py.File(outs / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout), "transform_matrices": {}})

    bins: dict[int, pd.DataFrame] = {}
    counts: dict[int, np.ndarray] = {}
    for size, grid, x in ((8, g8, x8), (16, g16, x16)):
        inside = (grid["x"] >= 0) & (grid["x"] < CROP_PX) & (grid["y"] >= 0) & (grid["y"] < CROP_PX)
        grid = grid[inside].copy()
        x = x[inside.to_numpy()]
        grid["in_tissue"] = (grid["spot"] >= 0).astype(np.int32)
        grid.index = pd.Index(
            [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(grid["array_row"], grid["array_col"], strict=True)],
            name="barcode",
        )
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        tissue = grid["in_tissue"].to_numpy() == 1
        write_10x_h5(
            folder / "filtered_feature_bc_matrix.h5",
            x[tissue],
            list(grid.index[tissue]),
            source.genes,
            library_id=library_id,
            chemistry="Visium HD v1",
        )
        table = pd.DataFrame(
            {
                "barcode": grid.index.to_numpy(),
                "in_tissue": grid["in_tissue"].to_numpy(),
                "array_row": grid["array_row"].to_numpy(),
                "array_col": grid["array_col"].to_numpy(),
                "pxl_row_in_fullres": grid["y"].to_numpy(),
                "pxl_col_in_fullres": grid["x"].to_numpy(),
            }
        )
        table.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        sf = {
            "spot_diameter_fullres": size / um,
            "bin_size_um": float(size),
            "microns_per_pixel": um,
            "regist_target_img_scalef": hires_scalef,
            "tissue_lowres_scalef": lowres_scalef,
            "fiducial_diameter_fullres": 40.0 / um,
            "tissue_hires_scalef": hires_scalef,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
        bins[size], counts[size] = grid, x[tissue]
    fullres = root / "microscope.tif"
    write_pyramid_tiff(fullres, image, n_sub=1, tile=256)
    return VisiumHDTruth(
        outs=outs,
        fullres=fullres,
        um_per_px=um,
        hires_scalef=hires_scalef,
        crop_origin=(int(x0), int(y0)),
        bins=bins,
        counts=counts,
        spot_counts=spot_counts,
        genes=list(source.genes),
    )
