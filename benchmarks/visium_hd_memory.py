"""Peak memory of reading a Visium HD slide, aggregating its bins and log-normalising, at full size.

Writes a Space Ranger HD ``outs/`` folder with 548 x 548 = 300,304 bins of 8 µm and 18,000 genes at
200 UMIs per bin (about 6e7 stored counts; genes drawn from a Zipf-like profile), then, in a fresh
process, runs what a user runs first and records the resident memory (RSS, sampled every 20 ms, plus
the kernel's peak) and the time of each step:

1. ``gd.io.visium_hd(path, bin_size=8)`` (spatialdata-io reads the counts and positions);
2. ``gd.pp.aggregate_bins(..., size_um=56)`` (sparse sums into 56 µm pseudo-spots);
3. ``gd.pp.check_raw_counts`` and ``gd.pp.log_normalize(X, dense=False)`` of all 18,000 genes (sparse
   float32), then ``gd.pp.select_genes`` (250 genes detected in >= 1 % of bins) and ``gd.pp.normalized_expression`` of those genes.

The layout's files are the ones spatialdata-io's ``visium_hd`` reader opens (checked against
spatialdata-io 0.7.1); there is no microscope image, so the H&E is the hires PNG. Prints a table and
writes ``benchmarks/results/visium_hd_memory.json``. Goal (issue "Real platforms"): < 4 GiB.

    python benchmarks/visium_hd_memory.py                 # full size (about 3 min on 2 CPU cores)
    python benchmarks/visium_hd_memory.py --side 100      # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
BIN_UM = 8.0
UM_PER_PX = 0.2738  # a typical Visium HD CytAssist full-resolution pixel
HIRES_PX = 2000


def write_layout(root: Path, side: int, n_genes: int, umis: int, seed: int = 0) -> dict:
    """Write ``root/outs`` (8 µm bins only) and return what was written."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from PIL import Image

    rng = np.random.default_rng(seed)
    outs = root / "outs"
    folder = outs / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    n = side * side
    rows, cols = np.divmod(np.arange(n), side)
    extent_px = side * BIN_UM / UM_PER_PX
    hires_scalef = HIRES_PX / extent_px
    pd.DataFrame(
        {
            "barcode": [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)],
            "in_tissue": np.ones(n, dtype=np.int32),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": (rows + 0.5) * BIN_UM / UM_PER_PX,
            "pxl_col_in_fullres": (cols + 0.5) * BIN_UM / UM_PER_PX,
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    sf = {
        "spot_diameter_fullres": BIN_UM / UM_PER_PX,
        "bin_size_um": BIN_UM,
        "microns_per_pixel": UM_PER_PX,
        "regist_target_img_scalef": hires_scalef,
        "tissue_lowres_scalef": hires_scalef / 3.3,
        "fiducial_diameter_fullres": 40.0 / UM_PER_PX,
        "tissue_hires_scalef": hires_scalef,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
    texture = rng.integers(150, 230, (HIRES_PX, HIRES_PX, 3), dtype=np.uint8)
    Image.fromarray(texture).save(outs / "spatial" / "tissue_hires_image.png", compress_level=1)
    Image.fromarray(texture[::3, ::3]).save(outs / "spatial" / "tissue_lowres_image.png", compress_level=1)
    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1], "num_row": side, "num_col": side}
    with h5py.File(outs / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout), "transform_matrices": {}})

    # counts: `umis` draws per bin from a Zipf-like gene profile, summed per (bin, gene), built in chunks
    p = 1.0 / np.arange(1, n_genes + 1) ** 0.9
    cdf = np.cumsum(p / p.sum())
    parts = []
    for a in range(0, n, 20_000):
        b = min(a + 20_000, n)
        genes = np.searchsorted(cdf, rng.random((b - a) * umis)).clip(max=n_genes - 1)
        bins = np.repeat(np.arange(a, b, dtype=np.int64), umis)
        key, counts = np.unique(bins * n_genes + genes, return_counts=True)
        parts.append((key // n_genes, key % n_genes, counts.astype(np.int32)))
    r, c, v = (np.concatenate(x) for x in zip(*parts, strict=True))
    x = sp.csr_matrix((v, (r, c)), shape=(n, n_genes))
    del r, c, v, parts
    barcodes = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"memory_hd"])
        f.attrs["chemistry_description"] = "Visium HD v1"
        f.attrs["software_version"] = "spaceranger-3.0.0"
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array([s.encode() for s in barcodes]))
        m.create_dataset("data", data=x.data, compression="gzip", compression_opts=1)
        m.create_dataset("indices", data=x.indices.astype(np.int64), compression="gzip", compression_opts=1)
        m.create_dataset("indptr", data=x.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([n_genes, n], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}".encode() for i in range(n_genes)]))
        feat.create_dataset("name", data=np.array([f"GENE{i}".encode() for i in range(n_genes)]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * n_genes))
    return {"n_bins": n, "n_genes": n_genes, "nnz": int(x.nnz), "total_umis": int(x.sum())}


class RSSMonitor:
    """Samples this process's resident memory every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def __enter__(self) -> RSSMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(root: Path) -> dict:
    """Read, aggregate and log-normalise the layout in this (fresh) process; memory and time per step."""
    import resource
    import warnings

    import scipy.sparse as sp

    warnings.filterwarnings("ignore")
    import genedml_sd as gd

    steps = []
    with RSSMonitor() as mon:
        base = mon.rss()

        def step(name: str, fn):
            t0 = time.perf_counter()
            out = fn()
            steps.append(
                {
                    "step": name,
                    "seconds": time.perf_counter() - t0,
                    "rss_after_mib": mon.rss() / 2**20,
                    "peak_so_far_mib": max(mon.peak, mon.rss()) / 2**20,
                }
            )
            return out

        sdata = step("gd.io.visium_hd(bin_size=8)", lambda: gd.io.visium_hd(root / "outs", bin_size=8))
        bins_key = next(k for k in sdata.shapes if k.endswith("square_008um"))
        table_key = next(k for k in sdata.tables if sdata.tables[k].n_obs == len(sdata[bins_key]))
        table = sdata.tables[table_key]
        sparse_in = sp.issparse(table.X)
        step("gd.pp.aggregate_bins(size_um=56)", lambda: gd.pp.aggregate_bins(sdata, bins_key, size_um=56))
        step("gd.pp.check_raw_counts", lambda: gd.pp.check_raw_counts(table, table_key=table_key))
        logn = step("gd.pp.log_normalize(dense=False), all genes", lambda: gd.pp.log_normalize(table.X, dense=False))
        genes = step("gd.pp.select_genes(250)", lambda: gd.pp.select_genes([table], 250, min_detection=0.01))
        expr = step("gd.pp.normalized_expression(250 genes)", lambda: gd.pp.normalized_expression(table, genes))
    return {
        "n_bins": int(table.n_obs),
        "n_genes": int(table.n_vars),
        "nnz": int(table.X.nnz),
        "counts_sparse": bool(sparse_in),
        "counts_dtype": str(table.X.dtype),
        "lognorm_sparse": bool(sp.issparse(logn)),
        "lognorm_dtype": str(logn.dtype),
        "expression_shape": list(expr.shape),
        "n_pseudo_spots_56um": int(len(sdata[f"{bins_key}_56um"])),
        "rss_start_mib": base / 2**20,
        "peak_rss_sampled_mib": mon.peak / 2**20,
        "peak_rss_kernel_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=548, help="bins per side (548 -> 300,304 bins)")
    ap.add_argument("--genes", type=int, default=18_000)
    ap.add_argument("--umis", type=int, default=200, help="UMIs per bin")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the measuring child process
    args = ap.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        written = write_layout(Path(tmp), args.side, args.genes, args.umis)
        write_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", tmp], capture_output=True, text=True, env=dict(os.environ)
        )
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    import platform

    import torch

    res.update(written=written, layout_mb=size_mb, write_seconds=write_s)
    res["device"] = {
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "cuda": bool(torch.cuda.is_available()),
    }
    print(
        f"Visium HD layout: {written['n_bins']:,} bins x {written['n_genes']:,} genes, {written['nnz']:,} stored "
        f"counts ({size_mb:.0f} MB on disk, written in {write_s:.0f} s)"
    )
    print("| step | seconds | RSS after (MiB) | peak so far (MiB) |\n|---|---|---|---|")
    for s in res["steps"]:
        print(f"| {s['step']} | {s['seconds']:.1f} | {s['rss_after_mib']:.0f} | {s['peak_so_far_mib']:.0f} |")
    print(
        f"peak RSS {res['peak_rss_kernel_mib']:.0f} MiB (kernel), {res['peak_rss_sampled_mib']:.0f} MiB (sampled); "
        f"counts sparse {res['counts_sparse']} ({res['counts_dtype']}), log-normalised sparse "
        f"{res['lognorm_sparse']} ({res['lognorm_dtype']}); goal < 4096 MiB"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("visium_hd_memory.json" if args.side == 548 else f"visium_hd_memory_side{args.side}.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
