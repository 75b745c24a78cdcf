"""Whole-slide image files as scanners write them: Aperio SVS, and a lazily generated 100,000 px wide slide.

The SVS layout follows tifffile 2026.3.3's ``TiffFile._series_svs`` (what it recognises as SVS): page 0 the
tiled baseline whose ``ImageDescription`` starts with ``"Aperio"`` and holds ``|MPP = ...|``, page 1 a stripped
thumbnail, then tiled reduced-resolution pages (NewSubfileType 0), then the label (NewSubfileType 1) and the
macro image (NewSubfileType 9).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .her2st import resize


def aperio_description(width: int, height: int, mpp: float, tile: int) -> str:
    """An Aperio ``ImageDescription`` for the baseline page."""
    return (
        f"Aperio Image Library v12.0.16 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=90"
        f"|AppMag = 20|StripeWidth = 2040|ScanScope ID = SS1302|Filename = B4|Date = 01/02/26|Time = 12:00:00"
        f"|User = test|MPP = {mpp}|Left = 25.0|Top = 18.0|LineCameraSkew = 0.0|Focus Offset = 0.0"
    )


def write_svs(path: Path, image: np.ndarray, *, mpp: float, tile: int = 256, n_levels: int = 2) -> list[np.ndarray]:
    """Write an SVS-like file (JPEG tiles) from an (H, W, 3) uint8 image; return the levels written."""
    import tifffile

    h, w = image.shape[:2]
    levels = [image] + [resize(image, 1 / 4**k) for k in range(1, n_levels + 1)]
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        desc = aperio_description(w, h, mpp, tile)
        kw: dict[str, Any] = {"photometric": "rgb", "compression": "jpeg", "metadata": None}
        tif.write(levels[0], tile=(tile, tile), description=desc, **kw)
        thumb = resize(image, 256 / max(h, w))
        tif.write(
            thumb, description=f"Aperio Image Library v12.0.16 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}", **kw
        )
        for lv in levels[1:]:
            tif.write(lv, tile=(tile, tile), description=f"Aperio Image Library v12.0.16 \r\n{w}x{h}", **kw)
        label = np.full((200, 200, 3), 230, np.uint8)
        tif.write(label, subfiletype=1, description="Aperio Image Library v12.0.16 \r\nlabel 200x200", **kw)
        macro = resize(image, 400 / max(h, w))
        tif.write(macro, subfiletype=9, description="Aperio Image Library v12.0.16 \r\nmacro", **kw)
    return levels


def write_huge(
    path: Path, tissue: np.ndarray, *, width: int = 100_000, height: int = 20_000, tile: int = 512
) -> tuple[int, int]:
    """A ``width`` x ``height`` px RGB slide (3 SubIFD levels, zlib) written tile by tile from a generator.

    Almost every tile is plain glass (value 240), encoded once; ``tissue`` (h, w, 3), a multiple of ``tile``,
    is placed at the tile grid origin ``(2, 3)`` of level 0. Returns the level-0 pixel origin ``(x, y)`` of it.
    Nothing of the size of the slide is ever held in memory: the file is a few MB.
    """
    import imagecodecs
    import tifffile

    glass = imagecodecs.zlib_encode(np.full((tile, tile, 3), 240, np.uint8).tobytes())
    th, tw = tissue.shape[0] // tile, tissue.shape[1] // tile
    special = {
        (2 + i, 3 + j): imagecodecs.zlib_encode(
            np.ascontiguousarray(tissue[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]).tobytes()
        )
        for i in range(th)
        for j in range(tw)
    }

    def tiles(h: int, w: int, extra: dict) -> Iterator[bytes]:
        for i in range(-(-h // tile)):
            for j in range(-(-w // tile)):
                yield extra.get((i, j), glass)

    kw: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "photometric": "rgb",
        "compression": "zlib",
        "metadata": None,
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            tiles(height, width, special),
            shape=(height, width, 3),
            subifds=3,
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
            **kw,
        )
        for k in (1, 2, 3):
            tif.write(tiles(height >> k, width >> k, {}), shape=(height >> k, width >> k, 3), subfiletype=1, **kw)
    return 3 * tile, 2 * tile
