"""Feature extraction shared by the processes of a multi-GPU / multi-node launch.

Under ``torchrun``, SLURM (``srun``) or Lightning's multi-node launch, every process runs the same
script, so every process calls :func:`genedml_sd.tl.fit` with the same slides. Instead of each one
encoding every slide, process ``rank`` encodes slides ``rank, rank + world_size, ...`` on its own GPU
(``cuda:<local rank>``) into the shared feature cache, then waits until the other processes' slides
are in the cache and reads them from there. The cache folder must therefore be on a file system
all processes see (``cache_dir=`` or ``$GENEDML_SD_CACHE``).

Waiting polls the cache folder rather than using a ``torch.distributed`` barrier, because the
process group does not exist yet at that point (Lightning creates it when training starts).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genedml_sd._settings import settings

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._extract import SpotFeatures
    from ._frozen import FrozenEncoder

logger = logging.getLogger(__name__)


def process_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process; ``(0, 1, 0)`` outside a multi-process launch.

    Read from an initialised ``torch.distributed`` process group, else from the launcher's
    environment: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, Lightning multi-node) or
    ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (batch jobs started with ``srun``).
    """
    import torch.distributed as dist

    env = os.environ
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0))
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    # SLURM: only for tasks started by srun in a batch job (an interactive shell has SLURM_NTASKS too)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and env.get("SLURM_JOB_NAME") != "bash":
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def extract_features_sharded(
    slides: Sequence[tuple[SpatialData, str | None, str | None]],
    encoder: FrozenEncoder,
    *,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 48 * 3600.0,
    poll_seconds: float = 5.0,
    **kwargs: Any,
) -> list[SpotFeatures]:
    """Features of several slides, each encoded by one process of a multi-process launch.

    In a single process this is ``[extract_features(s, ...) for s in slides]``.

    Parameters
    ----------
    slides
        ``(sdata, image_key, shapes_key)`` per slide, in the same order in every process.
    encoder
        The frozen encoder (same weights in every process).
    device
        Device of the encoder; default ``cuda:<local rank>`` when CUDA is available, else the CPU.
    cache_dir
        Feature cache root, shared by all processes (default ``settings.cache_dir / "features"``).
    timeout
        Seconds to wait for the other processes' slides before failing.
    poll_seconds
        Interval between looks at the cache while waiting.
    **kwargs
        Further :func:`~genedml_sd.encoders.extract_features` arguments (``geometry``,
        ``neighbours``, ``mode``, ``num_workers``, ...). ``use_cache`` must stay on.

    Returns
    -------
    One :class:`~genedml_sd.encoders.SpotFeatures` per slide, in the order of ``slides``.
    """
    import torch

    from genedml_sd.tiling import SpotTiler, TileGeometry

    from ._extract import extract_features, feature_cache_key

    rank, world, local_rank = process_rank()

    def one(i: int) -> SpotFeatures:
        sdata, image_key, shapes_key = slides[i]
        return extract_features(
            sdata, encoder, image_key=image_key, shapes_key=shapes_key, device=device, cache_dir=cache_dir, **kwargs
        )

    if world == 1:
        return [one(i) for i in range(len(slides))]
    if kwargs.get("use_cache", True) is False:
        raise ValueError(
            f"Sharded extraction over {world} processes exchanges features through the cache; use_cache=False."
        )
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    mine = list(range(rank, len(slides), world))
    logger.info("Process %d/%d encodes slides %s", rank, world, mine)
    out: dict[int, SpotFeatures] = {i: one(i) for i in mine}

    root = Path(cache_dir) if cache_dir is not None else settings.cache_dir / "features"
    geometry = kwargs.get("geometry") or TileGeometry()
    neighbours = kwargs.get("neighbours", True)
    mode = kwargs.get("mode", "spot")  # feature_cache_key maps local-only spot / lattice requests to one key
    deadline = time.monotonic() + timeout
    for i in range(len(slides)):
        if i in out:
            continue
        sdata, image_key, shapes_key = slides[i]
        key = feature_cache_key(SpotTiler(sdata, image_key, shapes_key, geometry), encoder, neighbours, mode)
        while not (root / key / "meta.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Process {rank}/{world}: slide {i} (image {image_key!r}) did not appear in the feature cache "
                    f"{root} within {timeout:.0f} s; is cache_dir on a file system all processes share?"
                )
            time.sleep(poll_seconds)
        out[i] = one(i)  # a cache hit
    return [out[i] for i in range(len(slides))]
