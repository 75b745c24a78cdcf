"""Small demo datasets in the output layouts of 10x Visium, Visium HD, Xenium and of an Aperio scanner.

Each function writes, into a new (or empty) folder, the files a platform's software writes, with the
names, keys and formats that :mod:`genedml_sd.io` (through spatialdata-io 0.7.1 and tifffile) reads, so
that the workflows of these platforms can be shown and tested offline. They are written from section
B4 of the HER2ST demo shipped with the package (:func:`~genedml_sd.datasets.her2st_demo`): the pixels
are its H&E and the counts its legacy-ST spot counts (the 200 genes with most counts, ERBB2 included).
The layouts themselves are simulated: the bins, cells and Visium spots are laid out here and the real
spot counts redistributed over them. They are not measurements of these platforms.

The writers and the truth they return (pixel sizes, positions, counts written) are in
:mod:`genedml_sd.datasets._layouts`; the functions here wrap them.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._layouts.her2st import her2st_b4, resize

if TYPE_CHECKING:
    from ._layouts.visium import VisiumTruth
    from ._layouts.visium_hd import VisiumHDTruth
    from ._layouts.xenium import XeniumTruth

WSI_NAME = "HER2ST_B4.svs"
"""File name of the slide written by :func:`wsi_layout` (its image element is ``"HER2ST_B4_he"``)."""


def _new_folder(path: str | PathLike[str], what: str) -> Path:
    """``path`` as a folder that exists and is empty; never one holding files (nothing is overwritten)."""
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        kind = "a folder that is not empty" if root.is_dir() else "a file"
        raise FileExistsError(
            f"{what} writes into a new or empty folder, but {root} is {kind}; pass another path "
            "(nothing is overwritten)."
        )
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------------- with the truth
def _visium_hd(path: str | PathLike[str], *, seed: int = 0) -> VisiumHDTruth:
    from ._layouts.visium_hd import write_visium_hd

    return write_visium_hd(_new_folder(path, "visium_hd_layout"), her2st_b4(), seed=seed)


def _visium(path: str | PathLike[str], *, seed: int = 0) -> VisiumTruth:
    from ._layouts.visium import write_visium

    return write_visium(_new_folder(path, "visium_layout"), her2st_b4(), seed=seed)


def _xenium(path: str | PathLike[str], *, seed: int = 0) -> XeniumTruth:
    from ._layouts.xenium import write_xenium

    return write_xenium(_new_folder(path, "xenium_layout"), her2st_b4(), seed=seed)


def _resample(image: np.ndarray, scale: float) -> np.ndarray:
    """(H, W, 3) uint8 resized by ``scale``: area average when shrinking, Lanczos when enlarging."""
    if scale <= 1:
        return resize(image, scale)
    from PIL import Image

    h, w = image.shape[:2]
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _wsi(
    path: str | PathLike[str], *, mpp: float | None = None, tile: int = 256, n_levels: int = 2
) -> tuple[Path, list[np.ndarray], float]:
    """Write the slide; return its file, the levels written (before JPEG) and the µm/px of level 0."""
    from ._layouts.wsi import write_svs

    if mpp is not None and not (np.isfinite(mpp) and 0.05 <= mpp <= 20):
        raise ValueError(
            f"mpp must be a pixel size between 0.05 and 20 µm/px (0.25 for 40x, 0.5 for 20x), got {mpp!r}."
        )
    if int(tile) != tile or tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 px (JPEG tiles), got {tile!r}.")
    if int(n_levels) != n_levels or not 0 <= n_levels <= 4:
        raise ValueError(f"n_levels must be an integer from 0 to 4 (reduced-resolution pages), got {n_levels!r}.")
    source = her2st_b4()
    image, um = source.image, source.um_per_px
    if mpp is not None:
        image, um = _resample(image, um / float(mpp)), float(mpp)
    file = _new_folder(path, "wsi_layout") / WSI_NAME
    levels = write_svs(file, image, mpp=um, tile=int(tile), n_levels=int(n_levels))
    return file, levels, um


# --------------------------------------------------------------------------------------------- public
def visium_hd_layout(path: str | PathLike[str], *, seed: int = 0) -> Path:
    """Write a Space Ranger Visium HD output (8 and 16 µm bins) made from the HER2ST demo section B4.

    A 1,100 x 1,100 px crop (about 1.51 x 1.51 mm at 1.376 µm/px) of the real B4 H&E, centred on the
    median of its spot centres, is the microscope image, written beside ``outs/`` as a tiled pyramidal
    TIFF, ``path / "microscope.tif"``. A grid of square 8 µm bins, rotated by 1 degree in the image,
    covers it; bins whose centre lies within 50 µm
    of a HER2ST spot centre are under tissue and share that spot's real counts at random (multinomial,
    equal probabilities), so the 8 µm bins under a spot add up exactly to its counts. 16 µm bins are the
    sums of 2 x 2 8 µm bins, as Space Ranger bins them. The counts are therefore the real HER2ST spot
    counts (200 genes, ERBB2 included) redistributed over bins: a simulated layout with real pixels and
    counts, not Visium HD data, and with no structure below the 100 µm spots.

    ``outs/`` holds ``feature_slice.h5``, ``spatial/tissue_{hires,lowres}_image.png`` and, per bin size,
    ``binned_outputs/square_{008,016}um/`` with ``filtered_feature_bc_matrix.h5`` (CellRanger v3 HDF5),
    ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json`` (``microns_per_pixel``,
    ``bin_size_um``, ``spot_diameter_fullres``), as spatialdata-io 0.7.1 reads them. Dataset id
    ``"HER2ST_B4_hd"``. About 6 MB; about 1 s (plus about 4 s, once per process, to read the demo).

    Parameters
    ----------
    path
        Folder to write into: created if missing, and it must be empty (nothing is overwritten).
    seed
        Seed of the random division of each spot's counts over its bins.

    Returns
    -------
    The ``outs/`` folder, ``path / "outs"``, to pass to :func:`genedml_sd.io.visium_hd`.

    Raises
    ------
    FileExistsError
        If ``path`` is a file or a folder that is not empty.

    Examples
    --------
    >>> import genedml_sd as gd
    >>> outs = gd.datasets.visium_hd_layout("b4_hd")  # doctest: +SKIP
    >>> bins = gd.io.visium_hd(outs, bin_size=8, fullres_image_file=outs.parent / "microscope.tif")  # doctest: +SKIP
    >>> bins["HER2ST_B4_hd_square_008um"]  # doctest: +SKIP
    """
    return _visium_hd(path, seed=seed).outs


def visium_layout(path: str | PathLike[str], *, seed: int = 0) -> Path:
    """Write a Space Ranger (2.x) Visium output made from the HER2ST demo section B4.

    The real B4 H&E (3,793 x 3,072 px at about 1.376 µm/px) is the full-resolution image, written beside
    ``outs/`` as a tiled pyramidal TIFF, ``path / "fullres.tif"``. The Visium array (55 µm spots 100 µm
    apart on the 78 x 128 hexagonal lattice, rotated by 1.5 degrees) is laid over it; spots within
    100 µm of a HER2ST spot are under tissue and get that spot's real counts thinned to the 55 µm spot's
    area (binomial, p = 0.3025). A simulated layout with real pixels and counts (the 200 genes with most
    counts, ERBB2 included), not Visium data: neighbouring Visium spots share one 100 µm spot's counts.

    ``outs/`` holds ``filtered_feature_bc_matrix.h5`` (CellRanger v3 HDF5, ``library_ids``
    ``"HER2ST_B4_visium"``) and ``spatial/`` with ``tissue_positions.csv``, ``scalefactors_json.json``
    (``spot_diameter_fullres`` = 55 µm in px) and the hires (2,000 px) and lowres (600 px) PNGs, as
    spatialdata-io 0.7.1 reads them. About 28 MB; about 1 s (plus about 4 s, once per process, to read the
    demo).

    Parameters
    ----------
    path
        Folder to write into: created if missing, and it must be empty (nothing is overwritten).
    seed
        Seed of the binomial thinning of the counts.

    Returns
    -------
    The ``outs/`` folder, ``path / "outs"``, to pass to :func:`genedml_sd.io.visium`.

    Raises
    ------
    FileExistsError
        If ``path`` is a file or a folder that is not empty.

    Examples
    --------
    >>> import genedml_sd as gd
    >>> outs = gd.datasets.visium_layout("b4_visium")  # doctest: +SKIP
    >>> spots = gd.io.visium(outs, fullres_image_file=outs.parent / "fullres.tif")  # doctest: +SKIP
    """
    return _visium(path, seed=seed).outs


def xenium_layout(path: str | PathLike[str], *, seed: int = 0) -> Path:
    """Write a Xenium Onboard Analysis 2.x output with a post-stained H&E, made from the HER2ST demo section B4.

    The H&E is a real 640 x 640 px crop (about 0.88 mm, 1.376 µm/px) of the B4 image, centred on the
    median of its spot centres, written as a pyramidal OME-TIFF ``HER2ST_B4_he_image.ome.tif`` with its
    Xenium Explorer alignment ``HER2ST_B4_he_imagealignment.csv`` (3 x 3 affine from H&E px to 0.2125 µm
    morphology px: rotation by 3 degrees and scaling). Cells lie on a jittered 16 µm grid over a
    520 x 520 µm region, where tissue is within 150 µm of a HER2ST spot, with irregular boundaries of
    4-7 µm radius; each cell's counts are its nearest spot's real counts thinned to the cell's area
    (binomial, p = area / (pi 50² µm²)). A simulated layout with real pixels and counts (200 genes, ERBB2
    included, plus 3 negative control probes), not Xenium data: there is no single-cell signal, and the
    "DAPI" image is the nucleus mask.

    The folder holds ``experiment.xenium``, ``cells.zarr.zip``, ``cells.parquet``,
    ``cell_feature_matrix.h5``, ``cell_boundaries.parquet``, ``nucleus_boundaries.parquet`` and
    ``morphology_focus/morphology_focus_0000.ome.tif``, as spatialdata-io 0.7.1 reads them (no
    ``transcripts.parquet``). Region name ``"HER2ST_B4_region"``. About 4 MB; about 1 s (plus about 4 s,
    once per process, to read the demo).

    Parameters
    ----------
    path
        Folder to write into (the Xenium output folder): created if missing, and it must be empty.
    seed
        Seed of the cell positions, shapes, ids and of the thinning of the counts.

    Returns
    -------
    ``path``, the Xenium output folder, to pass to :func:`genedml_sd.io.xenium` (which finds the H&E and
    its alignment in it).

    Raises
    ------
    FileExistsError
        If ``path`` is a file or a folder that is not empty.

    Examples
    --------
    >>> import genedml_sd as gd
    >>> root = gd.datasets.xenium_layout("b4_xenium")  # doctest: +SKIP
    >>> cells = gd.io.xenium(root)  # doctest: +SKIP
    >>> cells["HER2ST_B4_region_cells"]  # doctest: +SKIP
    """
    return _xenium(path, seed=seed).root


def wsi_layout(path: str | PathLike[str], *, mpp: float | None = None, tile: int = 256, n_levels: int = 2) -> Path:
    """Write an Aperio SVS-like whole-slide image of the HER2ST demo section B4.

    A tiled pyramidal TIFF with JPEG tiles laid out as Aperio scanners write SVS files (as tifffile
    recognises them): the baseline page, whose ``ImageDescription`` starts with ``"Aperio"`` and holds
    ``|MPP = <mpp>|`` (µm/px), a thumbnail, ``n_levels`` reduced-resolution pages (4x, 16x, ...), a
    label and a macro image. The pixels are the real B4 H&E of the demo (3,793 x 3,072 px at about
    1.376 µm/px), resampled to ``mpp`` when it is given; a real section is larger (the demo is cropped
    to its spots plus 300 µm) and a resampled one has no detail finer than the demo's pixels.

    Parameters
    ----------
    path
        Folder to write into: created if missing, and it must be empty (nothing is overwritten).
    mpp
        Pixel size of the baseline page, µm/px (e.g. 0.5 for a 20x scan): the demo image is resampled to
        it (Lanczos when enlarging, area average when shrinking). Default: the demo's own pixel size, no
        resampling. The recorded value is ``mpp``; the resampled image's true pixel size differs from it
        by less than one pixel over the image's width.
    tile
        Side of the JPEG tiles, px (a multiple of 16).
    n_levels
        Reduced-resolution pages after the baseline, each 4x smaller (0-4).

    Returns
    -------
    The slide file, ``path / "HER2ST_B4.svs"``, to pass to :func:`genedml_sd.io.wsi` (image element
    ``"HER2ST_B4_he"``). By default 3 MB, well under a second; at ``mpp=0.5`` 10,436 x 8,452 px, 17 MB on
    disk, about 5 s and 0.7 GB of memory while writing (the resampled image is held in memory).

    Raises
    ------
    FileExistsError
        If ``path`` is a file or a folder that is not empty.
    ValueError
        If ``mpp``, ``tile`` or ``n_levels`` is out of range.

    Examples
    --------
    >>> import genedml_sd as gd
    >>> slide = gd.datasets.wsi_layout("b4_slide", mpp=0.5)  # doctest: +SKIP
    >>> he = gd.io.wsi(slide)  # doctest: +SKIP
    >>> gd.io.get_pixel_size(he, "HER2ST_B4_he")  # doctest: +SKIP
    0.5
    """
    return _wsi(path, mpp=mpp, tile=tile, n_levels=n_levels)[0]
