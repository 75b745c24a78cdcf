"""HER2ST data: the small demo shipped with the package and a cached downloader of the full set."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.resources import files
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from genedml_sd._settings import settings

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

HER2ST_REPO = "almaan/her2st"
HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
HER2ST_BASE_URL = f"https://github.com/{HER2ST_REPO}/raw/{HER2ST_COMMIT}/"
DEMO_SECTIONS = ("B4", "C2", "C3", "C4")


def demo_path() -> Path:
    """Folder of the shipped HER2ST demo (legacy ST layout with a ``sections.csv`` index)."""
    return Path(str(files("genedml_sd.datasets") / "data" / "her2st_demo"))


def her2st_demo(sections: Sequence[str] | None = None) -> list[SpatialData]:
    """Small real HER2ST subset shipped with the package; no network needed.

    Sections B4 (patient B) and C2, C3, C4 (patient C) of :cite:`andersson2021`: H&E cropped to the
    spots plus a 300 µm margin and downscaled to about 1.38 µm/px (JPEG), the spot files, and raw
    counts of the genes detected in at least 10 % of the spots of one of these sections. Built by
    ``scripts/make_her2st_demo.py``.

    Parameters
    ----------
    sections
        Subset of ``("B4", "C2", "C3", "C4")``; all by default.

    Returns
    -------
    One SpatialData per section, as returned by :func:`genedml_sd.io.her2st` (patient and section
    in the table).

    Examples
    --------
    >>> import genedml_sd as gd
    >>> b4, c2, c3, c4 = gd.datasets.her2st_demo()
    """
    from genedml_sd.io import her2st as read_her2st

    chosen = list(DEMO_SECTIONS if sections is None else sections)
    unknown = [s for s in chosen if s not in DEMO_SECTIONS]
    if unknown:
        raise KeyError(f"Demo sections {unknown} do not exist; the demo has {list(DEMO_SECTIONS)}.")
    return [read_her2st(demo_path(), s) for s in chosen]


def her2st_registry() -> pd.DataFrame:
    """Files of the full HER2ST data set at the pinned commit: section, patient, kind, path, sha256.

    ``sha256`` is empty for files whose hash is not known in advance (most full-resolution JPEGs);
    those are downloaded without a hash check.
    """
    table = pd.read_csv(Path(str(files("genedml_sd.datasets") / "her2st_registry.csv")), dtype=str)
    return table.fillna("")


def fetch_her2st(sections: Sequence[str], *, cache_dir: str | PathLike | None = None) -> Path:
    """Download the files of some HER2ST sections into a cache (once) and return its root.

    Files come from the authors' repository at a pinned commit and are checked against known SHA-256
    hashes where available. The root has the repository's layout (``data/ST-cnts``, ...), which
    :func:`genedml_sd.io.her2st` reads.
    """
    import pooch

    registry = her2st_registry()
    unknown = sorted(set(sections) - set(registry.section))
    if unknown:
        raise KeyError(f"HER2ST sections {unknown} are not in the registry; known: {sorted(set(registry.section))}.")
    root = Path(cache_dir) if cache_dir is not None else settings.cache_dir / "her2st"
    fetcher = pooch.create(
        path=root,
        base_url=HER2ST_BASE_URL,
        registry={row.path: (f"sha256:{row.sha256}" if row.sha256 else None) for row in registry.itertuples()},
    )
    for row in registry[registry.section.isin(sections)].itertuples():
        fetcher.fetch(row.path, progressbar=settings.progress)
    return root


def her2st(
    sections: Sequence[str] = DEMO_SECTIONS,
    *,
    path: str | PathLike | None = None,
    cache_dir: str | PathLike | None = None,
) -> list[SpatialData]:
    """The full-resolution HER2ST sections, from a local folder or downloaded with a cache.

    Parameters
    ----------
    sections
        Section names, e.g. ``["B1", "B2", "C1"]`` (36 sections of patients A-H exist).
    path
        A local copy (either with a ``sections.csv`` index or in the authors' repository layout). When
        given, nothing is downloaded.
    cache_dir
        Download cache (default ``settings.cache_dir / "her2st"``).

    Returns
    -------
    One SpatialData per section (see :func:`genedml_sd.io.her2st`).
    """
    from genedml_sd.io import her2st as read_her2st

    root = Path(path) if path is not None else fetch_her2st(sections, cache_dir=cache_dir)
    return [read_her2st(root, s) for s in sections]
