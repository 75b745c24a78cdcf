"""Raw encoder throughput vs the full feature path (read + tile + encode), side by side.

For each encoder (random-init weights are fine for speed): tiles/s of the encoder alone on ready
uint8 tensors, and tiles/s of ``gd.encoders.extract_features`` on a real HER2ST section (pyramid
read, µm-aware resampling, DataLoader workers, encoding; cache disabled). The ratio full/raw is
the number to watch (goal >= 0.9). The same script runs unchanged on a GPU.

    python benchmarks/feature_throughput.py [--encoders vit-s16 vit-l16] [--spots 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, save

import genedml_sd as gd
from genedml_sd.encoders import extract_features, load_encoder
from genedml_sd.encoders._extract import _autocast


def raw_throughput(encoder, device, n_tiles: int, batch: int, precision: str) -> float:
    tiles = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    if device.type == "cuda":
        tiles = tiles.pin_memory()
    encoder = encoder.to(device).eval()
    with torch.inference_mode(), _autocast(device, precision):
        encoder(tiles[:2].to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n_tiles:
            encoder(tiles.to(device, non_blocking=True))
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def full_throughput(sdata, encoder, device, n_spots: int, batch_spots: int, precision: str) -> float:
    shapes_key = next(iter(sdata.shapes))
    sub = sdata.subset([next(iter(sdata.images)), shapes_key], filter_tables=False)
    sub.shapes[shapes_key] = sdata[shapes_key].iloc[:n_spots]
    t0 = time.perf_counter()
    feats = extract_features(
        sub, encoder, neighbours=False, batch_size=batch_spots, device=str(device), precision=precision, use_cache=False
    )
    return feats.n_spots / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoders", nargs="+", default=["vit-s16", "vit-l16"])
    p.add_argument("--spots", type=int, default=96, help="spots (= local tiles) per measurement")
    p.add_argument("--section", default="B4")
    p.add_argument("--precision", default="auto")
    p.add_argument("--rounds", type=int, default=2, help="interleaved raw/full measurements (median reported)")
    args = p.parse_args()

    gd.settings.progress = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sdata = gd.io.her2st(HER2ST, args.section)
    rows = []
    for name in args.encoders:
        enc = load_encoder(name, pretrained=False)
        batch = 32 if device.type == "cpu" else 256
        # interleaved raw / full / raw / full so that a change in machine load hits both alike
        raws, fulls = [], []
        for _ in range(args.rounds):
            raws.append(raw_throughput(enc, device, args.spots, batch, args.precision))
            fulls.append(full_throughput(sdata, enc, device, args.spots, batch, args.precision))
        raw, full = float(np.median(raws)), float(np.median(fulls))
        rows.append(
            {
                "encoder": name,
                "dim": enc.embed_dim,
                "raw_tiles_per_s": raw,
                "full_tiles_per_s": full,
                "ratio": full / raw,
            }
        )
        print(rows[-1], flush=True)
    print(f"\nDevice: {device} ({device_info()}); section {args.section}; {args.spots} local tiles per measurement")
    print(markdown_table(rows, ["encoder", "dim", "raw_tiles_per_s", "full_tiles_per_s", "ratio"]))
    print(f"peak host RSS {peak_rss_mb():.0f} MB")
    path = save(
        "feature_throughput", {"rows": rows, "device": device_info(), "peak_rss_mb": peak_rss_mb(), "spots": args.spots}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
