"""Time and peak memory of prediction for 1k, 10k and 100k spots on one slide.

Model part: ``GeneDML.predict_slide`` on cached feature arrays (local (N, D) in memory, neighbour
(N, 25, D) memory-mapped from a ``.npy`` file as the feature cache serves it, coordinates on a 100 µm hexagonal lattice), i.e. the slide-level transformer over all N spots
(query-chunked attention) plus the per-spot branches. Each size runs in its own process so that
its peak resident memory is its own. Tiling + encoding: ``extract_features`` (local tiles,
``stain-texture``) over a large pyramid made by tiling the demo's B4 H&E, with a hexagonal spot grid
from ``gd.pp.spot_grid``. The same script runs unchanged on a GPU.

    python benchmarks/scaling.py [--sizes 1000 10000 100000] [--dim 1024] [--encode-sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

from _common import AnonPeak, device_info, markdown_table, peak_rss_mb, save


def model_part(n: int, dim: int, genes: int, chunk: int) -> dict:
    import numpy as np
    import torch

    from genedml_sd.model import GeneDML, GeneDMLConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.divmod(np.arange(n), side)
    coords = np.stack([xx * 100.0 + (yy % 2) * 50.0, yy * 86.6], axis=1).astype(np.float32)
    local = torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32))
    # neighbour tokens as the feature cache holds them: a memory-mapped float32 .npy file on disk,
    # (N, 25, D) = 10 GB for 10^5 spots at D=1024, read batch by batch by predict_slide
    tmpdir = tempfile.mkdtemp(prefix="gd_scaling_")
    neighbour = np.lib.format.open_memmap(f"{tmpdir}/neighbour.npy", mode="w+", dtype=np.float32, shape=(n, 25, dim))
    for s in range(0, n, 2048):
        neighbour[s : s + 2048] = rng.normal(size=neighbour[s : s + 2048].shape).astype(np.float32)
    neighbour.flush()
    del neighbour
    neighbour = np.load(f"{tmpdir}/neighbour.npy", mmap_mode="r")
    cfg = GeneDMLConfig(enc_dim=dim, n_genes=genes, attn_chunk=chunk)
    model = GeneDML(cfg).to(device).eval()
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    with AnonPeak() as anon, torch.inference_mode():
        g = model.encode_global(local.to(device), torch.from_numpy(coords).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_global = time.perf_counter() - t0
        pred = model.predict_slide(local, torch.from_numpy(coords), neighbour, batch_size=1024)
        if device.type == "cuda":
            torch.cuda.synchronize()
    total = time.perf_counter() - t0
    assert pred.shape == (n, genes) and g.shape[0] == n
    shutil.rmtree(tmpdir, ignore_errors=True)
    return {
        "part": "model",
        "spots": n,
        "global_s": t_global,
        "predict_s": total,
        "us_per_spot": 1e6 * total / n,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss0,
        "peak_anon_mb": anon.peak_mb,
        "feature_mb": (local.numel() + neighbour.size) * 4 / 2**20,  # neighbour part memory-mapped
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def encode_part(n: int) -> dict:
    import numpy as np
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    import genedml_sd as gd
    from genedml_sd.encoders import extract_features, load_encoder

    gd.settings.progress = False
    b4 = gd.datasets.her2st_demo(["B4"])[0]
    img = np.asarray(b4["B4_he"]["scale0"]["image"].values)
    um = gd.io.get_pixel_size(b4, "B4_he")
    # tile the H&E until a 100 µm hexagonal grid over the whole image has >= n spots
    reps = 1
    while True:
        h, w = img.shape[1] * reps, img.shape[2] * reps
        if (h * um / 86.6) * (w * um / 100.0) >= n:
            break
        reps += 1
    import dask.array as da

    big = da.tile(da.from_array(img, chunks=(3, 1024, 1024)), (1, reps, reps))
    image = Image2DModel.parse(big, dims=("c", "y", "x"), scale_factors=[2, 2, 2], chunks=(3, 1024, 1024))
    s = sd.SpatialData(images={"big": image})
    gd.io.set_pixel_size(s, "big", um)
    gd.pp.spot_grid(s, "big", spacing_um=100.0, diameter_um=55.0, lattice="hex", mask=None)
    shapes = s["big_grid"].iloc[:n]
    s.shapes["big_grid"] = shapes
    enc = load_encoder("stain-texture")
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        feats = extract_features(s, enc, neighbours=False, use_cache=False)
    dt = time.perf_counter() - t0
    return {
        "part": "tiles+encode (local, stain-texture)",
        "spots": int(feats.n_spots),
        "image_px": f"{big.shape[1]}x{big.shape[2]}",
        "predict_s": dt,
        "us_per_spot": 1e6 * dt / feats.n_spots,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anon_mb": anon.peak_mb,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--encode-sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, n = args.child.split(":")
        out = model_part(int(n), args.dim, args.genes, args.chunk) if kind == "model" else encode_part(int(n))
        print("RESULT " + json.dumps(out))
        return
    rows = []
    jobs = [("model", n) for n in args.sizes] + [("encode", n) for n in args.encode_sizes]
    for kind, n in jobs:
        cmd = [sys.executable, __file__, "--child", f"{kind}:{n}", "--dim", str(args.dim), "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(res.stdout[-2000:], res.stderr[-4000:])
            raise SystemExit(f"{kind} {n} failed")
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    print(f"\nDevice: {device_info()}; encoder width D={args.dim}, attention query chunk {args.chunk}")
    print(markdown_table(rows, ["part", "spots", "predict_s", "us_per_spot", "peak_rss_mb", "peak_anon_mb"]))
    print(f"wrote {save('scaling', {'rows': rows, 'device': device_info(), 'dim': args.dim, 'chunk': args.chunk})}")


if __name__ == "__main__":
    main()
