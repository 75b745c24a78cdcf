"""PyTorch ``Dataset`` / ``DataLoader`` over spot tiles, decoding in worker processes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._settings import settings

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset as _TorchDataset

    from ._tiler import CentredTiler
else:
    try:  # torch is a hard dependency, but keep this module importable for docs builds without it
        from torch.utils.data import Dataset as _TorchDataset
    except ImportError:  # pragma: no cover
        _TorchDataset = object


class SpotTileBatches(_TorchDataset):
    """A map-style dataset whose item ``i`` is the ``i``-th batch of tiles of a tiler.

    Batches (not single tiles) are the unit so that each worker reads the windows of a whole batch
    with one ``dask.compute`` and resamples them in one vectorised call. Use it with
    ``DataLoader(ds, batch_size=None)``, see :func:`tile_loader`.

    Parameters
    ----------
    tiler
        The tile source: a :class:`SpotTiler`, :class:`LatticeTiler` or any :class:`CentredTiler`.
    kind
        ``"local"`` (items ``(B, 3, px, px)``) or ``"neighbour"`` (items ``(B, grid**2, 3, px, px)``).
    batch_size
        Spots per batch.
    indices
        Spots to read (default: all, in shapes order).

    Items are dicts ``{"index": LongTensor (B,), "tiles": uint8 tensor}``.
    """

    def __init__(self, tiler: CentredTiler, kind: str, batch_size: int, indices: np.ndarray | None = None) -> None:
        if kind not in ("local", "neighbour"):
            raise ValueError(f"kind must be 'local' or 'neighbour', got {kind!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.tiler, self.kind, self.batch_size = tiler, kind, int(batch_size)
        self.indices = np.arange(tiler.n_spots) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import torch
        from torch.utils.data import get_worker_info

        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.indices[i * self.batch_size : (i + 1) * self.batch_size]
        # inside a worker, dask must not start its own thread pool on top of the processes
        scheduler = "synchronous" if get_worker_info() is not None else None
        read = self.tiler.local_tiles if self.kind == "local" else self.tiler.neighbour_tiles
        tiles = read(chunk, scheduler=scheduler)
        return {"index": torch.from_numpy(chunk), "tiles": torch.from_numpy(tiles)}


def tile_loader(
    tiler: CentredTiler,
    kind: str = "local",
    *,
    batch_size: int = 64,
    indices: np.ndarray | None = None,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` that yields batches of tiles decoded in worker processes.

    Parameters
    ----------
    tiler
        The tile source.
    kind
        ``"local"`` or ``"neighbour"``.
    batch_size
        Spots per batch (a neighbour batch holds ``batch_size * grid**2`` tiles).
    indices
        Spots to read (default: all).
    num_workers
        Worker processes (default ``gd.settings.n_jobs``; 0 reads in the main process).
    pin_memory
        Pin host memory for fast GPU transfer (default: when CUDA is available).
    prefetch_factor
        Batches prefetched per worker.

    Returns
    -------
    A loader over dicts ``{"index": (B,), "tiles": uint8 (B, ..., 3, px, px)}``, in spot order.
    """
    import torch
    from torch.utils.data import DataLoader

    ds = SpotTileBatches(tiler, kind, batch_size, indices)
    workers = settings.n_workers if num_workers is None else int(num_workers)
    workers = max(0, min(workers, len(ds)))
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    kwargs: dict[str, Any] = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if workers > 0 else {}
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **kwargs)
