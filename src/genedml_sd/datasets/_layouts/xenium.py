"""A Xenium Onboard Analysis 2.x output folder with a post-stained H&E, written from a real HER2ST section.

Files and keys checked against spatialdata-io 0.7.1 (``readers/xenium.py``: ``xenium``, ``_XeniumCells``,
``_get_polygons``, ``_get_tables_and_circles``, ``_get_morphology_focus``, ``xenium_aligned_image``;
``XeniumKeys``):

- ``experiment.xenium`` (JSON; the reader uses ``pixel_size`` and ``analysis_sw_version`` "xenium-2.0.0.10");
- ``cells.zarr.zip`` (zarr v2 in a zip): ``cell_id`` (N, 2) uint32 = (prefix, dataset suffix), which encodes the
  string ids (8 hex nibbles of the prefix written as the letters a-p, then ``-<suffix>``); ``cell_summary``
  (N, 8) with ``attrs["column_names"]``; ``polygon_sets/{0,1}/cell_index`` (XOA >= 2.0: nucleus and cell
  polygons -> cell row; raster label = polygon index + 1); ``masks/{0,1}`` (nucleus / cell label rasters in
  morphology pixels);
- ``cells.parquet`` (``cell_id``, ``x_centroid``, ``y_centroid`` in µm, ``cell_area``, ``nucleus_area``, ...);
- ``cell_feature_matrix.h5`` (CellRanger v3 HDF5; gene and negative-control features);
- ``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet`` (``cell_id``, ``vertex_x``, ``vertex_y`` in µm,
  ``label_id``; each polygon's rows contiguous and closed);
- ``morphology_focus/morphology_focus_0000.ome.tif`` (DAPI, uint16, pyramidal OME-TIFF);
- the post-stained H&E ``<name>_he_image.ome.tif`` (pyramidal OME-TIFF, YXS) and its Xenium Explorer alignment
  ``<name>_he_imagealignment.csv``: a 3 x 3 affine matrix, no header, from H&E pixels to morphology pixels.

``transcripts.parquet`` is not written: the reader needs it only with ``transcripts=True``.

Geometry: morphology pixels are 0.2125 µm; the H&E is a crop of the section (about 1.376 µm/px) rotated by
3 degrees and scaled onto them. Cells lie on a jittered 16 µm grid over tissue (within 150 µm of a HER2ST
spot), with irregular 13-vertex boundaries of 4-7 µm radius, nuclei at half that; each cell's counts are its
nearest spot's counts thinned to the cell's area (binomial).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .her2st import Source
from .tenx import write_10x_h5, write_pyramid_tiff

PIXEL_SIZE = 0.2125
HE_CROP = 640
REGION_UM = 520.0
ANGLE_DEG = 3.0


@dataclass
class XeniumTruth:
    """What a layout was written from."""

    root: Path
    he_image: Path
    alignment_file: Path
    alignment: np.ndarray  # 3 x 3, H&E px -> morphology px
    he: np.ndarray  # (H, W, 3) the H&E written
    he_um_per_px: float
    cells: pd.DataFrame  # cell_id, x_centroid, y_centroid (µm), cell_area (µm²), he_x, he_y (H&E px)
    counts: np.ndarray  # cells x genes
    genes: list[str]


def cell_id_strings(prefix: np.ndarray, suffix: int = 1) -> list[str]:
    """Xenium cell ids: the 8 hex nibbles of each uint32 prefix as letters ('0' -> 'a' ... 'f' -> 'p'), '-suffix'."""
    return ["".join(chr(ord("a") + int(c, 16)) for c in f"{int(p):08x}") + f"-{suffix}" for p in prefix]


def _ring(cx: float, cy: float, r: float, phase: float, n: int = 13) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = r * (1 + 0.12 * np.sin(3 * t + phase))
    ring = np.column_stack([cx + rr * np.cos(t), cy + rr * np.sin(t)])
    return np.vstack([ring, ring[:1]])


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def _boundaries(rings: list[np.ndarray], ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_id": np.repeat(ids, [len(r) for r in rings]),
            "vertex_x": np.concatenate([r[:, 0] for r in rings]).astype(np.float32),
            "vertex_y": np.concatenate([r[:, 1] for r in rings]).astype(np.float32),
            "label_id": np.repeat(np.arange(1, len(rings) + 1, dtype=np.uint32), [len(r) for r in rings]),
        }
    )


def _raster(rings_px: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Label raster (uint32, 0 = background) of polygons given in pixel coordinates (x, y)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("I", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for label, ring in enumerate(rings_px, start=1):
        draw.polygon([tuple(p) for p in ring[:-1]], fill=label)
    return np.asarray(canvas).astype(np.uint32)


def write_xenium(root: Path, source: Source, *, name: str = "HER2ST_B4", seed: int = 0) -> XeniumTruth:
    """Write a Xenium output folder at ``root`` with an aligned H&E (see the module docstring)."""
    import tifffile
    import zarr

    rng = np.random.default_rng(seed)
    um = source.um_per_px
    centre = np.median(source.spots_xy, axis=0).round().astype(int)
    x0, y0 = centre - HE_CROP // 2
    he = source.image[y0 : y0 + HE_CROP, x0 : x0 + HE_CROP].copy()
    spots_he = source.spots_xy - np.array([x0, y0])

    # H&E px -> morphology px: rotate about the crop centre, scale to 0.2125 µm/px, put the region at the origin
    s, t = um / PIXEL_SIZE, math.radians(ANGLE_DEG)
    lin = s * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    region_px = REGION_UM / PIXEL_SIZE
    shift = np.array([region_px / 2, region_px / 2]) - lin @ np.array([HE_CROP / 2, HE_CROP / 2])
    alignment = np.eye(3)
    alignment[:2, :2], alignment[:2, 2] = lin, shift

    g = np.arange(8.0, REGION_UM - 8.0, 16.0)
    cx, cy = (a.ravel() for a in np.meshgrid(g, g))
    cx, cy = cx + rng.uniform(-1.5, 1.5, cx.size), cy + rng.uniform(-1.5, 1.5, cy.size)
    inv = np.linalg.inv(alignment)
    he_xy = (np.column_stack([cx, cy, np.ones_like(cx)]) / np.array([PIXEL_SIZE, PIXEL_SIZE, 1])) @ inv.T
    d = np.linalg.norm(he_xy[:, None, :2] - spots_he[None], axis=2)
    keep = d.min(axis=1) * um < 150.0
    cx, cy, he_xy, nearest = cx[keep], cy[keep], he_xy[keep, :2], d.argmin(axis=1)[keep]
    n = len(cx)
    prefix = rng.choice(2**32 - 1, size=n, replace=False).astype(np.uint32)
    prefix.sort()
    ids = cell_id_strings(prefix)
    radius = rng.uniform(4.0, 7.0, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    cells_r = [_ring(x, y, r, p) for x, y, r, p in zip(cx, cy, radius, phase, strict=True)]
    nuclei_r = [_ring(x, y, r / 2, p) for x, y, r, p in zip(cx, cy, radius, phase, strict=True)]
    area = np.array([_area(r) for r in cells_r])
    nucleus_area = np.array([_area(r) for r in nuclei_r])
    counts = rng.binomial(source.counts[nearest], np.minimum(1.0, area / (np.pi * 50.0**2))[:, None])
    n_ctrl = 3
    x = np.hstack([counts, rng.binomial(1, 0.01, (n, n_ctrl))])
    features = [*source.genes, *[f"NegControlProbe_{i:05d}" for i in range(n_ctrl)]]
    ftypes = ["Gene Expression"] * len(source.genes) + ["Negative Control Probe"] * n_ctrl

    root.mkdir(parents=True, exist_ok=True)
    version = "xenium-2.0.0.10"
    experiment = {
        "major_version": 5,
        "minor_version": 0,
        "run_name": f"{name}_run",
        "region_name": f"{name}_region",
        "preservation_method": "FFPE",
        "num_cells": n,
        "panel_name": "HER2ST-derived panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": len(source.genes),
        "pixel_size": PIXEL_SIZE,
        "instrument_sw_version": "2.0.0.10",
        "analysis_sw_version": version,
        "z_step_size": 3.0,
        "images": {"morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"},
    }
    (root / "experiment.xenium").write_text(json.dumps(experiment, indent=4))
    write_10x_h5(
        root / "cell_feature_matrix.h5", x, ids, features, library_id=None, feature_types=ftypes, software=version
    )
    total = counts.sum(axis=1)
    pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": cx,
            "y_centroid": cy,
            "transcript_counts": total,
            "control_probe_counts": x[:, -n_ctrl:].sum(axis=1),
            "total_counts": total,
            "cell_area": area,
            "nucleus_area": nucleus_area,
            "nucleus_count": np.ones(n, dtype=np.uint32),
            "segmentation_method": "Segmented by nucleus expansion of 5.0µm",
        }
    ).to_parquet(root / "cells.parquet", index=False)
    _boundaries(cells_r, ids).to_parquet(root / "cell_boundaries.parquet", index=False)
    _boundaries(nuclei_r, ids).to_parquet(root / "nucleus_boundaries.parquet", index=False)

    side = int(math.ceil(region_px))
    masks = [_raster([r / PIXEL_SIZE for r in rings], (side, side)) for rings in (nuclei_r, cells_r)]
    store = zarr.storage.ZipStore(root / "cells.zarr.zip", mode="w")
    group = zarr.group(store=store, zarr_format=2, attributes={"major_version": 5, "number_cells": n})
    group.create_array("cell_id", data=np.column_stack([prefix, np.ones(n, np.uint32)]), chunks=(max(n, 1), 2))
    summary = np.column_stack([cx, cy, area, cx, cy, nucleus_area, np.zeros(n), np.ones(n)])
    columns = ["cell_centroid_x", "cell_centroid_y", "cell_area", "nucleus_centroid_x", "nucleus_centroid_y"]
    columns += ["nucleus_area", "z_level", "nucleus_count"]
    group.create_array("cell_summary", data=summary, chunks=(max(n, 1), 8), attributes={"column_names": columns})
    for k in (0, 1):
        group.create_array(f"polygon_sets/{k}/cell_index", data=np.arange(n, dtype=np.uint32), chunks=(max(n, 1),))
        group.create_array(f"masks/{k}", data=masks[k], chunks=(1024, 1024))
    store.close()

    dapi = np.where(masks[0] > 0, 3000, 200).astype(np.uint16)
    (root / "morphology_focus").mkdir(exist_ok=True)
    with tifffile.TiffWriter(root / "morphology_focus" / "morphology_focus_0000.ome.tif", bigtiff=True) as tif:
        meta = {"axes": "YX", "PhysicalSizeX": PIXEL_SIZE, "PhysicalSizeY": PIXEL_SIZE, "Channel": {"Name": "DAPI"}}
        tif.write(dapi, subifds=1, tile=(512, 512), compression="zlib", metadata=meta)
        tif.write(dapi[::2, ::2], subfiletype=1, tile=(512, 512), compression="zlib")

    he_image = root / f"{name}_he_image.ome.tif"
    write_pyramid_tiff(he_image, he, n_sub=1, tile=256, ome_um=um)
    alignment_file = root / f"{name}_he_imagealignment.csv"
    pd.DataFrame(alignment).to_csv(alignment_file, header=False, index=False)
    cells = pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": cx,
            "y_centroid": cy,
            "cell_area": area,
            "he_x": he_xy[:, 0],
            "he_y": he_xy[:, 1],
        }
    )
    return XeniumTruth(
        root=root,
        he_image=he_image,
        alignment_file=alignment_file,
        alignment=alignment,
        he=he,
        he_um_per_px=um,
        cells=cells,
        counts=counts,
        genes=list(source.genes),
    )
