"""Readers for legacy Spatial Transcriptomics (ST) data, and the HER2ST layout built on them."""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._build import build_spot_sdata, pixel_size_from_lattice

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0


def read_rgb(path: str | PathLike) -> np.ndarray:
    """Decode an RGB image file (JPEG, PNG, TIFF) into a ``(y, x, 3)`` ``uint8`` array."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed PIL's decompression-bomb guard
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def legacy_st(
    counts: str | PathLike,
    spots: str | PathLike,
    image: str | PathLike,
    *,
    sample_id: str,
    um_per_px: float | None = None,
    coord_to_image_scale: tuple[float, float] = (1.0, 1.0),
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    spot_pitch_um: float = ST_SPOT_PITCH_UM,
    patient: str | None = None,
    section: str | None = None,
) -> SpatialData:
    """Read one legacy ST section (counts + spot file + H&E) into SpatialData.

    Parameters
    ----------
    counts
        Tab-separated counts, spots x genes, first column spot ids ``"<x>x<y>"`` (array column and
        row), first row gene symbols; may be gzipped.
    spots
        Spot selection file with columns ``x y new_x new_y pixel_x pixel_y``; ``pixel_x``/``pixel_y`` are
        the spot centre (column/row) in the *original* full-resolution image, in px.
    image
        The H&E image file.
    sample_id
        Name of the sample; prefixes element names.
    um_per_px
        Pixel size of ``image`` in µm/px. By default it is derived from the spot lattice
        (``spot_pitch_um`` between neighbouring spots).
    coord_to_image_scale
        ``(sx, sy)``: ``image px = spot-file px * s``; 1 when the image is the original scan.
    spot_diameter_um
        Spot diameter (µm), 100 for legacy ST.
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots (µm), 200 for legacy ST.
    patient, section
        Sample metadata stored in the table (``obs`` columns and ``uns["genedml_sd"]``).

    Returns
    -------
    SpatialData with image ``f"{sample_id}_he"`` (multiscale), circles ``f"{sample_id}_spots"`` and table
    ``"table"``. The coordinate system ``"global"`` is the original image's pixel frame; spots and
    counts are inner-joined on the spot id.
    """
    cnt = pd.read_csv(counts, sep="\t", index_col=0)
    cnt.index = cnt.index.astype(str)
    sel = pd.read_csv(spots, sep="\t")
    missing_cols = {"x", "y", "pixel_x", "pixel_y"} - set(sel.columns)
    if missing_cols:
        raise ValueError(f"Spot file {spots} lacks columns {sorted(missing_cols)}.")
    sel.index = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
    sel = sel[~sel.index.duplicated()]
    ids = [i for i in cnt.index if i in sel.index]
    if not ids:
        raise ValueError(f"No spot id of {counts} (e.g. {list(cnt.index[:3])}) matches the spot file {spots}.")
    dropped = len(cnt) - len(ids), len(sel) - len(ids)
    if any(dropped):
        logger.info(
            "%s: %d counted spots without position and %d positions without counts dropped", sample_id, *dropped
        )
    cnt, sel = cnt.loc[ids], sel.loc[ids]
    values = cnt.to_numpy()
    if not np.issubdtype(values.dtype, np.number) or np.isnan(values.astype(np.float64)).any():
        raise ValueError(f"Counts file {counts} has non-numeric or NaN values.")

    rgb = read_rgb(image)
    sx, sy = coord_to_image_scale
    pixel_xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    array_xy = sel[["new_x", "new_y"]].to_numpy(np.float64) if "new_x" in sel else sel[["x", "y"]].to_numpy(np.float64)
    if um_per_px is None:
        um_per_px_spots = pixel_size_from_lattice(array_xy, pixel_xy, spot_pitch_um)
        um_per_px = um_per_px_spots / float(np.mean([sx, sy]))
    else:
        um_per_px_spots = um_per_px * float(np.mean([sx, sy]))

    img_xy = pixel_xy * np.array([sx, sy])
    h, w = rgb.shape[:2]
    off = ~((img_xy[:, 0] >= 0) & (img_xy[:, 0] < w) & (img_xy[:, 1] >= 0) & (img_xy[:, 1] < h))
    if off.any():
        raise ValueError(
            f"{off.sum()} spots of {sample_id!r} lie outside the image {image} ({w} x {h} px), "
            f"e.g. {list(sel.index[off][:5])}; check coord_to_image_scale={coord_to_image_scale}."
        )

    obs = pd.DataFrame(
        {
            "barcode": sel.index.to_numpy(),
            "array_col": sel["x"].to_numpy(int),
            "array_row": sel["y"].to_numpy(int),
        },
        index=pd.Index([f"{sample_id}_{i}" for i in sel.index]),
    )
    info = {
        "technology": "legacy_st",
        "platform": "legacy_st",
        "observation": "spot",
        "observation_um": float(spot_diameter_um),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um),
        "um_per_px_image": float(um_per_px),
    }
    if patient is not None:
        info["patient"] = str(patient)
    if section is not None:
        info["section"] = str(section)
    return build_spot_sdata(
        rgb,
        um_per_px=um_per_px,
        spots_xy=pixel_xy,
        spot_radius=spot_diameter_um / 2 / um_per_px_spots,
        counts=values,
        obs=obs,
        var_names=pd.Index(cnt.columns.astype(str)),
        sample_id=sample_id,
        image_to_spots_scale=(1 / sx, 1 / sy),
        sample_info=info,
    )


def _her2st_files(root: Path, section: str) -> tuple[Path, Path, Path, tuple[float, float]]:
    """Locate counts, spot file, image and coordinate scale of a HER2ST section under ``root``."""
    index = root / "sections.csv"
    if index.exists():
        table = pd.read_csv(index, index_col="section")
        if section not in table.index:
            raise KeyError(f"Section {section!r} is not in {index}; available: {sorted(table.index)}.")
        row = table.loc[section]
        if not bool(row.get("has_image", True)) or pd.isna(row.get("image_path")):
            raise FileNotFoundError(f"Section {section!r} has no H&E image under {root}.")
        scale = (float(row["coord_to_image_scale_x"]), float(row["coord_to_image_scale_y"]))
        return root / row["counts_path"], root / row["spotfile_path"], root / row["image_path"], scale
    # Layout of the authors' repository: data/ST-cnts, data/ST-spotfiles, data/ST-imgs/<P>/<S>/*.jpg
    base = root / "data" if (root / "data").is_dir() else root
    counts = base / "ST-cnts" / f"{section}.tsv.gz"
    spots = base / "ST-spotfiles" / f"{section}_selection.tsv"
    images = sorted((base / "ST-imgs" / section[0] / section).glob("*.jpg"))
    for p in (counts, spots):
        if not p.exists():
            raise FileNotFoundError(f"HER2ST section {section!r}: {p} does not exist.")
    if not images:
        raise FileNotFoundError(
            f"HER2ST section {section!r}: no image under {base / 'ST-imgs' / section[0] / section}."
        )
    return counts, spots, images[0], (1.0, 1.0)


def her2st(path: str | PathLike, section: str) -> SpatialData:
    """Read one section of the HER2ST breast-cancer data set :cite:`andersson2021` into SpatialData.

    Parameters
    ----------
    path
        Folder holding the data: either with a ``sections.csv`` index (as in the folders shipped
        with :mod:`genedml_sd.datasets`), or in the layout of the authors' repository
        (``data/ST-cnts``, ``data/ST-spotfiles``, ``data/ST-imgs``).
    section
        Section name, patient letter + replicate, e.g. ``"B4"``.

    Returns
    -------
    See :func:`legacy_st`. The pixel size is derived from the 200 µm spot lattice; patient and section
    are stored in the table.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"HER2ST folder {root} does not exist.")
    counts, spots, image, scale = _her2st_files(root, section)
    return legacy_st(
        counts,
        spots,
        image,
        sample_id=section,
        coord_to_image_scale=scale,
        patient=section[0],
        section=section,
    )
