"""Feature extraction with a frozen encoder, cached on disk per (slide, encoder + weights, tile geometry, mode)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genedml_sd._settings import settings
from genedml_sd._spatial import image_levels
from genedml_sd.tiling import LATTICE_VERSION, LatticeTiler, SpotTiler, TileGeometry, plan_lattice, tile_loader

from ._cache import CacheEntry, EntryWriter, read_entry
from ._dense import DENSE_VERSION, extract_dense
from ._frozen import autocast_context as _autocast

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from ._frozen import FrozenEncoder

logger = logging.getLogger(__name__)

MODES = ("spot", "lattice", "dense")

_SPOT_CENTRED = ("spot", "lattice")  # modes whose local features are the spot-centred tiles


@dataclass
class SpotFeatures:
    """Frozen-encoder features of the spots (observations) of one slide.

    Attributes
    ----------
    local
        Local features, float32 (n_spots, D): of the spot-centred tile (modes ``"spot"``,
        ``"lattice"``) or read at the spot's position in its lattice tile (``"dense"``).
    neighbour
        Features of the ``grid x grid`` neighbour tiles, float32 (n_spots, grid**2, D), or ``None``
        (``neighbours=False``, and always in mode ``"dense"``, which gives ``tokens`` and
        ``token_index`` instead; :meth:`neighbour_tokens` gathers them in every mode).
    coords_um
        Spot centres in µm in the image's full-resolution pixel frame (``x, y``), (n_spots, 2).
    spot_ids
        Index of the shapes element, in row order.
    key
        Cache key of these features.
    n_encoded_tiles
        Tiles the encoder ran on to compute these features (recorded in the cache, so also set on a
        cache hit; ``None`` for caches written before it was recorded).
    mode
        ``"spot"``, ``"lattice"`` or ``"dense"`` (see :func:`extract_features`).
    tokens
        Mode ``"dense"`` with neighbours: pooled features of the lattice tiles, float32 (n_tokens, D);
        ``None`` otherwise.
    token_index
        Mode ``"dense"`` with neighbours: row of ``tokens`` of each spot's neighbour token, int64
        (n_spots, grid**2), token ``t = row * grid + col`` as in ``neighbour``; the centre token is the
        lattice tile containing the spot. ``None`` otherwise.
    """

    local: np.ndarray
    neighbour: np.ndarray | None
    coords_um: np.ndarray
    spot_ids: np.ndarray
    key: str
    n_encoded_tiles: int | None = None
    mode: str = "spot"
    tokens: np.ndarray | None = None
    token_index: np.ndarray | None = None

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return self.local.shape[0]

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.local.shape[1]

    def neighbour_tokens(self, indices: np.ndarray | slice | None = None) -> np.ndarray | None:
        """Neighbour tokens of some spots, float32 (n, grid**2, D), in every mode; ``None`` without neighbours.

        Parameters
        ----------
        indices
            Spot rows (default: all). In mode ``"dense"`` the tokens are gathered from ``tokens``
            (select few spots at a time: all of them is ``n_spots * grid**2 * D`` floats).

        Returns
        -------
        The tokens, token ``t = row * grid + col``; ``None`` when the features have no neighbour tokens.
        """
        sel = slice(None) if indices is None else indices
        if self.neighbour is not None:
            return np.asarray(self.neighbour[sel])
        if self.tokens is None or self.token_index is None:
            return None
        return np.asarray(self.tokens)[np.asarray(self.token_index[sel])]

    @property
    def encoded_tiles_per_spot(self) -> float | None:
        """Encoder calls (tiles) per spot, ``None`` when unknown."""
        return None if self.n_encoded_tiles is None else self.n_encoded_tiles / max(self.n_spots, 1)


# slide fingerprints of dask-backed images in this process, by the dask name of their coarsest level
_FINGERPRINTS: dict[tuple, str] = {}
_MAX_FINGERPRINTS = 1024


def slide_fingerprint(tiler: SpotTiler) -> str:
    """Stable hash of what determines a slide's tiles: pixels, pyramid, pixel size and spot centres.

    Reads only the coarsest pyramid level (a thumbnail), never the full image. Computing that level
    can still mean decoding the whole scan when the pyramid is built lazily from one JPEG (about 1 s
    per HER2ST section), so for dask-backed images the result is remembered in this process under
    the dask name of the level (a token of the graph that produces its pixels), together with the
    shapes, pixel size and spot centres.
    """
    levels = tiler.levels
    shapes = json.dumps([list(lv.shape) for lv in levels])
    centres = np.round(tiler.centres_px(0), 2).astype(np.float64)
    um = np.float64(tiler.um_per_px0)
    coarse = levels[-1].data
    name = getattr(coarse, "name", None)  # dask arrays only
    memo = (name, shapes, um.tobytes(), hashlib.sha256(centres.tobytes()).hexdigest()) if name else None
    if memo is not None and memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    h = hashlib.sha256()
    h.update(shapes.encode())
    h.update(um.tobytes())
    thumb = np.asarray(coarse[:, ::4, ::4].compute() if hasattr(coarse, "compute") else levels[-1])
    h.update(np.ascontiguousarray(thumb).tobytes())
    h.update(centres.tobytes())
    fingerprint = h.hexdigest()[:20]
    if memo is not None:
        if len(_FINGERPRINTS) >= _MAX_FINGERPRINTS:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[memo] = fingerprint
    return fingerprint


def feature_cache_key(tiler: SpotTiler, encoder: FrozenEncoder, neighbours: bool, mode: str = "spot") -> str:
    """Cache key combining slide fingerprint, encoder fingerprint, tile geometry and feature mode.

    The lattice mode only changes neighbour tokens, so local-only features share the spot-mode key;
    the spot-mode keys are those of earlier versions (existing caches stay valid). Dense keys (with
    or without neighbours) also name the dense definition and whether the local features are
    interpolated from token grids (:attr:`FrozenEncoder.has_token_grid`).
    """
    parts = [slide_fingerprint(tiler), encoder.fingerprint, tiler.geometry.key(), "nb" if neighbours else "local"]
    if neighbours and mode == "lattice":
        parts.append(LATTICE_VERSION)
    if mode == "dense":
        interp = "tokens" if getattr(encoder, "has_token_grid", False) else "pooled"
        parts += [LATTICE_VERSION, DENSE_VERSION, interp]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _encode(
    encoder: FrozenEncoder, tiles: torch.Tensor, device: torch.device, precision: str, chunk: int
) -> np.ndarray:
    """Encode uint8 tiles (n, 3, H, W) in chunks; float32 (n, D) on the host."""
    import torch

    out = []
    with torch.inference_mode(), _autocast(device, precision):
        for start in range(0, tiles.shape[0], chunk):
            x = tiles[start : start + chunk].to(device, non_blocking=True)
            out.append(encoder(x).float().cpu())
    return torch.cat(out).numpy()


def extract_features(
    sdata: SpatialData,
    encoder: FrozenEncoder,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    geometry: TileGeometry | None = None,
    neighbours: bool = True,
    mode: str = "spot",
    batch_size: int = 8,
    encode_batch_size: int = 256,
    device: str | None = None,
    precision: str = "auto",
    num_workers: int | None = None,
    cache_dir: str | PathLike | None = None,
    use_cache: bool = True,
) -> SpotFeatures:
    """Encode the local tile and the neighbour grid of every spot, reusing a disk cache.

    Parameters
    ----------
    sdata
        SpatialData with the image and the spots; not modified.
    encoder
        A frozen encoder from :func:`genedml_sd.encoders.load_encoder`.
    image_key, shapes_key
        Elements to use; inferred when unambiguous.
    geometry
        Tile geometry (µm, px); the paper's by default.
    neighbours
        Also encode the ``grid x grid`` neighbour tiles. The local feature is then the centre
        neighbour tile's (identical tile, encoded once).
    mode
        How neighbour tokens are made. ``"spot"`` (default, paper-faithful): every spot's own
        ``grid x grid`` tiles centred on the spot, ``grid**2`` encoder calls per spot. ``"lattice"``:
        the image is tiled by a fixed lattice of ``tile_um`` tiles anchored at pixel ``(0, 0)``; the
        lattice tiles needed by any spot are encoded once and each spot gathers the ``grid x grid``
        block around the lattice tile containing its centre (every token shifted by the same snapping
        offset, at most ``tile_um * sqrt(2) / 2``, 79 µm for 112 µm tiles). The local feature, and the
        centre token, stay the exact spot-centred tile. Calls per spot: 1 + lattice tiles / spots
        (about 5 instead of 25 on HER2ST). Same shapes and token order as ``"spot"``; ignored when
        ``neighbours=False``. See :class:`~genedml_sd.tiling.LatticeTiler`. ``"dense"``, for
        observations smaller than or as dense as a tile (Visium HD bins, cells): no tile is cut per
        spot; the same lattice is encoded once (only the tiles containing a spot when
        ``neighbours=False``) and each spot's local feature is read at its own position in the
        lattice tile containing its centre: the bilinear interpolation of that tile's token grid
        (:meth:`FrozenEncoder.token_grid`, e.g. 14 x 14 cells of 8 µm for a ViT-x/16 on 112 µm
        tiles; border cells extended), or that tile's pooled feature for encoders without one
        (:attr:`FrozenEncoder.has_token_grid`). Neighbour tokens are the lattice tiles' pooled
        features ``tokens`` (n_tokens, D) with rows ``token_index`` (n_spots, grid**2) instead of a
        ``neighbour`` array; the centre token is the containing tile. Calls: lattice tiles, whatever
        the number of spots (see :func:`encoder_calls`).
    batch_size
        Spots per tile batch read by a worker (a neighbour batch holds ``batch_size * grid**2`` tiles;
        a lattice batch as many lattice tiles).
    encode_batch_size
        Tiles per encoder call.
    device
        Torch device; ``None`` picks CUDA when available.
    precision
        ``"auto"`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``"32"``, ``"16"`` or ``"bf16"``.
    num_workers
        Tile-decoding worker processes. Default: ``gd.settings.n_jobs`` on a GPU; one on
        the CPU, where the encoder itself needs the cores (measured: 1 worker 299 tiles/s, 2 workers 248,
        none 233 with ``stain-texture`` on 2 cores).
    cache_dir
        Feature cache root (default ``settings.cache_dir / "features"``).
    use_cache
        Read and write the cache. Any change of pixels, spots, pixel size, encoder weights,
        tile geometry or mode changes the key, so stale features are never reused. Entries are
        verified when read (file sizes and SHA-256 recorded when written; a damaged entry is logged
        and recomputed) and published atomically, so several processes may fill one cache at once
        (see the feature cache).

    Returns
    -------
    The features, with spot order equal to the shapes element's; ``n_encoded_tiles`` counts the
    encoder calls (tiles) they cost.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not neighbours and mode == "lattice":
        mode = "spot"  # local tiles are spot-centred in both modes
    tiler = SpotTiler(sdata, image_key, shapes_key, geometry)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    coords_um = tiler.centres_px(0) * tiler.um_per_px0
    root = Path(cache_dir) if cache_dir is not None else settings.cache_dir / "features"
    key = feature_cache_key(tiler, encoder, neighbours, mode)
    dense = mode == "dense"
    n_nb = tiler.geometry.n_neighbours if neighbours else None
    if use_cache:
        # a neighbour cache also holds the local features: of either spot-centred mode for a spot-centred
        # request, a dense one for a dense request (dense local features differ from spot-centred ones)
        candidates = [key]
        if not neighbours:
            modes = ("dense",) if dense else _SPOT_CENTRED
            candidates = [feature_cache_key(tiler, encoder, True, m) for m in modes] + [key]
        for k in candidates:
            entry = read_entry(
                root, k, n_spots=tiler.n_spots, dim=encoder.embed_dim, n_neighbours=n_nb, dense=dense and neighbours
            )
            if entry is not None:
                logger.info("Feature cache hit for %s (%s)", tiler.image_key, entry.folder)
                return _from_entry(entry, tiler, coords_um, k, mode)

    encoder = encoder.to(dev).eval()
    g = tiler.geometry
    if num_workers is None:
        # on a GPU every core can decode; on the CPU the encoder needs the cores, one decoder keeps it fed
        num_workers = settings.n_workers if dev.type == "cuda" else min(1, settings.n_workers)
    loader_kw = {"num_workers": num_workers, "pin_memory": dev.type == "cuda"}
    extra_meta: dict = {}
    tokens = token_index = None
    # per-spot neighbour tokens go straight into the cache file: host memory stays bounded by the batch
    writer = EntryWriter(root, key) if use_cache and neighbours and mode == "spot" else None
    try:
        if dense:
            neighbour = None
            local, tokens, token_index, n_encoded, extra_meta = extract_dense(
                tiler, encoder, neighbours, dev, precision, batch_size, encode_batch_size, loader_kw
            )
        elif mode == "lattice":
            local, neighbour, n_encoded, extra_meta = _extract_lattice(
                tiler, encoder, dev, precision, batch_size, encode_batch_size, loader_kw
            )
        else:
            neighbour = None
            if neighbours:
                shape = (tiler.n_spots, g.n_neighbours, encoder.embed_dim)
                neighbour = writer.open_neighbour(shape) if writer is not None else np.zeros(shape, dtype=np.float32)
            local, n_encoded = _extract_spots(
                tiler, encoder, neighbour, dev, precision, batch_size, encode_batch_size, loader_kw
            )
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if use_cache:
        meta = {
            "n_spots": tiler.n_spots,
            "image_key": tiler.image_key,
            "shapes_key": tiler.shapes_key,
            "encoder": encoder.name,
            "encoder_fingerprint": encoder.fingerprint,
            "geometry": g.to_dict(),
            "levels": len(image_levels(sdata[tiler.image_key])),
            "mode": mode,
            "n_encoded_tiles": int(n_encoded),
            **extra_meta,
        }
        memmapped = isinstance(neighbour, np.memmap)
        if isinstance(neighbour, np.memmap):
            # already in the entry's file: close the writable map before the folder moves
            neighbour.flush()
            neighbour = None
        writer = writer or EntryWriter(root, key)
        try:
            published = writer.commit(local, neighbour, meta, tokens=tokens, token_index=token_index)
        except BaseException:
            writer.discard()
            raise
        if not published:  # another process wrote the same entry first: serve its files, as a cache hit would
            entry = read_entry(
                root, key, n_spots=tiler.n_spots, dim=encoder.embed_dim, n_neighbours=n_nb, dense=dense and neighbours
            )
            if entry is None:
                raise RuntimeError(f"Feature cache entry {root / key} was removed while this process was using it.")
            return _from_entry(entry, tiler, coords_um, key, mode)
        if memmapped:
            neighbour = np.load(root / key / "neighbour.npy", mmap_mode="r")  # read-only, as a cache hit
    return SpotFeatures(
        local,
        neighbour,
        coords_um,
        tiler.spot_ids,
        key,
        n_encoded_tiles=int(n_encoded),
        mode=mode,
        tokens=tokens,
        token_index=token_index,
    )


def _from_entry(entry: CacheEntry, tiler: SpotTiler, coords_um: np.ndarray, key: str, mode: str) -> SpotFeatures:
    return SpotFeatures(
        entry.local,
        entry.neighbour,
        coords_um,
        tiler.spot_ids,
        key,
        n_encoded_tiles=entry.meta.get("n_encoded_tiles"),
        mode=mode,
        tokens=entry.tokens,
        token_index=entry.token_index,
    )


def _extract_spots(
    tiler: SpotTiler,
    encoder: FrozenEncoder,
    neighbour: np.ndarray | None,
    dev: torch.device,
    precision: str,
    batch_size: int,
    encode_batch_size: int,
    loader_kw: dict,
) -> tuple[np.ndarray, int]:
    """Spot-mode features: ``(local, n_encoded_tiles)``; neighbour tokens are written into ``neighbour`` if given."""
    from tqdm.auto import tqdm

    g = tiler.geometry
    local = np.zeros((tiler.n_spots, encoder.embed_dim), dtype=np.float32)
    kind = "neighbour" if neighbour is not None else "local"
    loader = tile_loader(tiler, kind, batch_size=batch_size, **loader_kw)
    desc = f"encoding {tiler.image_key} ({encoder.name})"
    bar = tqdm(total=tiler.n_spots, desc=desc, disable=not settings.progress)
    for batch in loader:
        idx = batch["index"].numpy()
        tiles = batch["tiles"]
        if neighbour is not None:
            flat = tiles.reshape(-1, *tiles.shape[2:])
            feats = _encode(encoder, flat, dev, precision, encode_batch_size).reshape(len(idx), g.n_neighbours, -1)
            neighbour[idx] = feats
            local[idx] = feats[:, g.n_neighbours // 2]
        else:
            local[idx] = _encode(encoder, tiles, dev, precision, encode_batch_size)
        bar.update(len(idx))
    bar.close()
    return local, tiler.n_spots * (g.n_neighbours if neighbour is not None else 1)


def _extract_lattice(
    tiler: SpotTiler,
    encoder: FrozenEncoder,
    dev: torch.device,
    precision: str,
    batch_size: int,
    encode_batch_size: int,
    loader_kw: dict,
) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """Lattice-mode features: ``(local, neighbour, n_encoded_tiles, meta)``, see :func:`extract_features`."""
    from tqdm.auto import tqdm

    g = tiler.geometry
    centre = g.n_neighbours // 2
    plan = plan_lattice(tiler.centres_px(0), tiler.um_per_px0, g)
    lattice = LatticeTiler.from_plan(tiler, plan)
    off = np.flatnonzero(~plan.on_lattice)  # spots whose exact local tile is not a lattice tile
    n_encoded = plan.n_tiles + len(off)
    bar = tqdm(
        total=n_encoded, desc=f"encoding {tiler.image_key} lattice ({encoder.name})", disable=not settings.progress
    )
    tokens = np.zeros((plan.n_tiles, encoder.embed_dim), dtype=np.float32)
    for batch in tile_loader(lattice, "local", batch_size=batch_size * g.n_neighbours, **loader_kw):
        idx = batch["index"].numpy()
        tokens[idx] = _encode(encoder, batch["tiles"], dev, precision, encode_batch_size)
        bar.update(len(idx))
    local = tokens[plan.token_index[:, centre]]  # exact for on-lattice spots, replaced below for the others
    if len(off):
        for batch in tile_loader(tiler, "local", batch_size=batch_size * g.n_neighbours, indices=off, **loader_kw):
            idx = batch["index"].numpy()
            local[idx] = _encode(encoder, batch["tiles"], dev, precision, encode_batch_size)
            bar.update(len(idx))
    bar.close()
    neighbour = tokens[plan.token_index]
    neighbour[:, centre] = local  # the centre token is the exact local tile, as in spot mode
    meta = {"lattice": plan.meta(tiler.um_per_px0, g)}
    return local, neighbour, n_encoded, meta
