"""Spot neighbourhoods on a (square or hexagonal) lattice: pitch estimate and the (2r+1)^2 slots of every spot.

Used by NH2ST's neighbour branch (pure numpy / torch).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def estimate_pitch(coords_um: torch.Tensor | np.ndarray, *, max_samples: int = 1024, refine: int = 3) -> float:
    """Lattice pitch (µm) of a spot layout, from nearest-neighbour distances.

    Starts from the median nearest-neighbour distance ``p``, then (``refine`` times) replaces it by
    the median of the distances to each spot's 8 nearest spots that lie in ``(0.5 p, 1.3 p)``: the
    first lattice ring (4 spots on a square lattice, 6 on a hexagonal one; the square diagonals at
    ``1.41 p`` and the second hexagonal ring at ``1.73 p`` are excluded). On an exact lattice both
    agree; under positional jitter the plain nearest-neighbour median is biased low (it is a minimum
    over the ring), the refined one is not.

    The distances are taken for at most ``max_samples`` spots (evenly spaced in the input order, so
    the result is deterministic), each against *all* spots: ``O(max_samples x N)``, in chunks.
    Coincident spots (distance 0) are ignored.

    Parameters
    ----------
    coords_um
        Spot centres in µm, (N, 2), N >= 2.
    max_samples
        Number of spots whose neighbour distances enter the medians.
    refine
        Refinement iterations (0: the median nearest-neighbour distance).

    Returns
    -------
    The pitch in µm.
    """
    c = torch.as_tensor(np.asarray(coords_um, dtype=np.float64))
    n = c.shape[0]
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {tuple(c.shape)}.")
    if n < 2:
        raise ValueError("Estimating the lattice pitch needs at least 2 spots.")
    c = (c - c.mean(0)).float()
    sample = np.unique(np.linspace(0, n - 1, min(n, max_samples)).round().astype(np.int64))
    k = min(8, n)
    near = []
    for s in range(0, len(sample), 128):
        rows = torch.from_numpy(sample[s : s + 128])
        d = torch.cdist(c[rows], c, compute_mode="donot_use_mm_for_euclid_dist")
        d[d <= 1e-6] = math.inf  # the spot itself and exact duplicates
        near.append(d.topk(k, dim=1, largest=False).values.double())
    dist = torch.cat(near)  # (samples, k), ascending, inf where fewer distinct spots
    nearest = dist[:, 0][torch.isfinite(dist[:, 0])]
    if nearest.numel() == 0:
        raise ValueError("All spots coincide; cannot estimate the lattice pitch.")
    pitch = float(nearest.median())
    for _ in range(refine):
        ring = dist[(dist > 0.5 * pitch) & (dist < 1.3 * pitch)]
        if ring.numel() == 0:
            break
        pitch = float(ring.median())
    return pitch


def spot_neighbourhood(
    coords_um: torch.Tensor | np.ndarray, pitch_um: float | None = None, radius: int = 2
) -> torch.Tensor:
    """Indices of the spots in the ``(2r+1) x (2r+1)`` lattice neighbourhood of every spot.

    The lattice offset of spot j from spot i is ``round((c_j - c_i) / pitch)`` (per axis, halves
    rounded up). Slot ``(dy + r) * (2r + 1) + (dx + r)`` of row i holds the spot at offset
    ``(dx, dy)`` with ``|dx|, |dy| <= r`` (x = first coordinate), -1 where there is none; the centre
    slot is always the spot itself. If several spots fall in one slot, the one closest to the exact
    lattice offset wins (coincident duplicates of spot i never appear in its row).

    Offsets are pairwise, so the result does not depend on the origin and tolerates positional jitter
    below a quarter of the pitch. Spots are bucketed in a hash grid of cell size ``pitch`` (a sort +
    binary search), and only the ``(2r+3)^2`` surrounding cells are searched: ``O(N log N)``.

    Square lattices (legacy ST, 200 µm pitch) map one-to-one onto the slots. On a hexagonal Visium
    lattice (rows ``pitch * sqrt(3)/2`` apart, odd rows shifted by half a pitch) rounding on the pitch
    still gives a compact neighbourhood: with ``r = 2`` the rows at ``±0.87`` and ``±1.73`` pitch map to
    ``dy = ±1, ±2`` without collisions, and a half-pitch shift ``dx = ±0.5`` is rounded up (to 1 and 0),
    so the neighbourhood is the 5 nearest hexagonal rows, slightly skewed within shifted rows.

    Parameters
    ----------
    coords_um
        Spot centres in µm, (N, 2).
    pitch_um
        Centre-to-centre distance of the lattice in µm; ``None`` estimates it as the median
        nearest-neighbour distance, refined (:func:`estimate_pitch`).
    radius
        Neighbourhood radius r in lattice steps (2 for the 5x5 neighbourhood).

    Returns
    -------
    LongTensor (N, (2r+1)^2) of spot indices, -1 for empty slots (on the CPU).
    """
    c = np.asarray(coords_um.detach().cpu() if isinstance(coords_um, torch.Tensor) else coords_um, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {c.shape}.")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    n = c.shape[0]
    side = 2 * radius + 1
    t = side * side
    centre = t // 2
    out = np.full((n, t), -1, dtype=np.int64)
    if n == 0:
        return torch.from_numpy(out)
    if not np.isfinite(c).all():
        raise ValueError("coords contain NaN or infinite values.")
    if pitch_um is None:
        if n < 2:
            out[:, centre] = np.arange(n)
            return torch.from_numpy(out)
        pitch_um = estimate_pitch(c)
    if not pitch_um > 0:
        raise ValueError(f"pitch_um must be > 0, got {pitch_um}.")

    u = (c - c.min(axis=0)) / float(pitch_um)  # lattice units, >= 0
    cell = np.floor(u).astype(np.int64)
    w = radius + 1  # |round(off)| <= r  =>  |cell difference| <= r + 1
    nx = int(cell[:, 0].max()) + 1 + 2 * w  # padded row length: no wrap-around between rows
    key = (cell[:, 1] + w) * nx + (cell[:, 0] + w)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    best = np.full((n, t), np.inf)
    for dy in range(-w, w + 1):
        for dx in range(-w, w + 1):
            query = key + dy * nx + dx
            lo = np.searchsorted(sorted_key, query, side="left")
            count = np.searchsorted(sorted_key, query, side="right") - lo
            m = 0
            while True:  # m-th spot of each searched cell (cells hold few spots)
                i = np.flatnonzero(count > m)
                if i.size == 0:
                    break
                j = order[lo[i] + m]
                off = u[j] - u[i]
                s = np.floor(off + 0.5)
                ok = (np.abs(s) <= radius).all(axis=1)
                i, j, off, s = i[ok], j[ok], off[ok], s[ok]
                err = ((off - s) ** 2).sum(axis=1)
                slot = ((s[:, 1] + radius) * side + (s[:, 0] + radius)).astype(np.int64)
                better = err < best[i, slot]  # each i appears once per pass: no write conflicts
                best[i[better], slot[better]] = err[better]
                out[i[better], slot[better]] = j[better]
                m += 1
    out[:, centre] = np.arange(n)
    return torch.from_numpy(out)
