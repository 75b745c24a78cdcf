"""Tiles per second of the multi-scale tiler on a real full-resolution HER2ST section.

Measures, in one run, local tiles (112 µm -> 224 px) and neighbour grids (560 µm -> 5x5 x 224 px)
read from the B4 pyramid (0.69 µm/px JPEG), in the main process and through the DataLoader with
worker processes. Prints a markdown table and writes ``benchmarks/results/tiling_throughput.json``.

    python benchmarks/tiling_throughput.py [--section B4] [--workers 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, save

import genedml_sd as gd
from genedml_sd.tiling import SpotTiler, tile_loader


def run(tiler: SpotTiler, kind: str, batch: int, workers: int, n_spots: int) -> dict:
    idx = np.arange(min(n_spots, tiler.n_spots))
    per_spot = 1 if kind == "local" else tiler.geometry.n_neighbours
    t0 = time.perf_counter()
    n = 0
    for b in tile_loader(tiler, kind, batch_size=batch, indices=idx, num_workers=workers):
        n += b["tiles"].shape[0] * per_spot
    dt = time.perf_counter() - t0
    return {"kind": kind, "workers": workers, "tiles": n, "seconds": dt, "tiles_per_s": n / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--section", default="B4")
    p.add_argument("--workers", type=int, default=gd.settings.n_workers)
    p.add_argument("--spots", type=int, default=256)
    args = p.parse_args()

    gd.settings.progress = False
    sdata = gd.io.her2st(HER2ST, args.section)
    tiler = SpotTiler(sdata)
    rows = []
    for kind, batch, spots in (("local", 64, args.spots), ("neighbour", 4, args.spots // 4)):
        for workers in sorted({0, args.workers}):
            rows.append(run(tiler, kind, batch, workers, spots))
    table = markdown_table(rows, ["kind", "workers", "tiles", "seconds", "tiles_per_s"])
    print(
        f"Section {args.section}, image {gd.io.get_pixel_size(sdata, f'{args.section}_he'):.3f} µm/px, "
        f"tiles at {tiler.geometry.um_per_px} µm/px from level {tiler.level_for(tiler.geometry.um_per_px).level}"
    )
    print(table)
    info = device_info()
    print(f"device: {info}  peak RSS {peak_rss_mb():.0f} MB")
    path = save(
        "tiling_throughput", {"section": args.section, "rows": rows, "device": info, "peak_rss_mb": peak_rss_mb()}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
