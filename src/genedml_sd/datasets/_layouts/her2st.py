"""The real HER2ST section every layout is written from: the demo's B4 (image, spot centres, raw counts)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Source:
    """One real HER2ST section in plain arrays.

    Attributes
    ----------
    image
        H&E, (H, W, 3) uint8.
    um_per_px
        Its pixel size (µm/px), from the 200 µm legacy-ST lattice.
    spots_xy
        Spot centres (x, y) in image px, (n_spots, 2).
    counts
        Raw counts of ``genes``, (n_spots, n_genes) int64.
    genes
        Gene symbols (the most expressed genes of the section, ERBB2 included).
    """

    image: np.ndarray
    um_per_px: float
    spots_xy: np.ndarray
    counts: np.ndarray
    genes: list[str]


@functools.cache
def her2st_b4(n_genes: int = 200) -> Source:
    """Section B4 of the demo shipped with the package (3793 x 3072 px at about 1.376 µm/px, 283 spots)."""
    from genedml_sd._spatial import get_pixel_size, spots_to_pixels
    from genedml_sd.datasets._her2st import demo_path
    from genedml_sd.io import her2st

    sdata = her2st(demo_path(), "B4")
    table = sdata.tables["table"]
    x = table.X.toarray().astype(np.int64)
    order = np.argsort(-x.sum(axis=0), kind="stable")[:n_genes]
    erbb2 = table.var_names.get_loc("ERBB2")
    if erbb2 not in order:
        order[-1] = erbb2
    image = sdata["B4_he"]["scale0"]["image"].values.transpose(1, 2, 0).copy()
    return Source(
        image=image,
        um_per_px=get_pixel_size(sdata, "B4_he"),
        spots_xy=spots_to_pixels(sdata, "B4_spots", "B4_he"),
        counts=x[:, order],
        genes=[str(g) for g in table.var_names[order]],
    )


def barcodes(n: int, length: int = 16, suffix: str = "-1") -> list[str]:
    """Distinct 10x-style nucleotide barcodes (``"AAACAAGTATCTCCCA-1"``), deterministic."""
    out = []
    for i in range(n):
        v, s = i * 2654435761 % 4**length, []
        for _ in range(length):
            v, r = divmod(v, 4)
            s.append("ACGT"[r])
        out.append("".join(s) + suffix)
    return out


_RESIZED: dict[tuple[int, tuple[int, ...], float], tuple[np.ndarray, np.ndarray]] = {}


def resize(image: np.ndarray, scale: float) -> np.ndarray:
    """Downscale an (H, W, 3) uint8 image by ``scale`` with PIL's area filter (as Space Ranger's PNGs are).

    Results are cached for the session (layouts written several times from one source reuse them).
    """
    from PIL import Image

    key = (id(image), image.shape, float(scale))
    if key not in _RESIZED:
        h, w = image.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        _RESIZED[key] = (image, np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX)))
    return _RESIZED[key][1]
