from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
HER2ST = Path(os.environ.get("GENEDML_SD_HER2ST", HER2ST))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write feature caches or downloads into the user's home during tests."""
    import genedml_sd as gd

    monkeypatch.setattr(gd.settings, "cache_dir", tmp_path_factory.getbasetemp() / "gd-cache")
    monkeypatch.setattr(gd.settings, "progress", False)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (tiny tensors: fastest, and no OpenMP spin-waits on a shared CPU).

    Modules of small-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def her2st_root() -> Path:
    if not (HER2ST / "sections.csv").exists():
        pytest.skip(f"HER2ST data not found at {HER2ST}")
    return HER2ST


@pytest.fixture(scope="session")
def her2st_index(her2st_root) -> pd.DataFrame:
    return pd.read_csv(her2st_root / "sections.csv", index_col="section")


@pytest.fixture(scope="session")
def b4(her2st_root):
    import genedml_sd as gd

    return gd.io.her2st(her2st_root, "B4")


@pytest.fixture(scope="session")
def demo():
    import genedml_sd as gd

    return gd.datasets.her2st_demo()


def coordinate_image(height: int, width: int, origin=(0, 0), step: int = 1) -> np.ndarray:
    """uint8 (3, h, w) image whose pixels encode the level-0 pixel they sample.

    Pixel (i, j) encodes level-0 column ``x = origin_x + j * step`` and row ``y = origin_y + i * step``
    as R = x % 256, G = y % 256, B = 16 * (x // 256) + y // 256 (exact for x, y < 4096).
    """
    ys = origin[1] + np.arange(height)[:, None] * step
    xs = origin[0] + np.arange(width)[None, :] * step
    ys, xs = np.broadcast_arrays(ys, xs)
    return np.stack([xs % 256, ys % 256, 16 * (xs // 256) + ys // 256]).astype(np.uint8)


def decode_coordinates(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`coordinate_image` for a (3, h, w) uint8 tile: (x, y) arrays."""
    r, g, b = (tile[c].astype(np.int64) for c in range(3))
    return r + 256 * (b // 16), g + 256 * (b % 16)
