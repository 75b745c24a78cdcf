"""Visium HD at platform scale: read, aggregate, features, one epoch of Gene-DML and predict at 10^4-10^6 bins.

For each size N a synthetic Space Ranger HD ``outs/`` folder is written (in its own process) and then
measured in a fresh process:

* layout: a square grid of ``ceil(sqrt(N))**2`` 8 µm bins (0.8, 2.5 and 8 mm across for 10^4, 10^5 and
  10^6), all of them in ``filtered_feature_bc_matrix.h5``; the microscope image is a real HER2ST H&E
  (full-resolution section JPEG, 0.69 µm/px), cropped around the tissue and, where the capture area is
  larger than the tissue, tiled by mirrored copies of its tissue region, written as a pyramidal TIFF at the
  HER2ST pixel size (not upsampled to Visium HD's 0.27 µm/px). Counts are sparse and simulated: the real
  section's pseudo-bulk profile of its ``--layout-genes`` most expressed genes (Zipf-like), tilted per bin
  by the local stain (optical density of the bin, smoothed over ~24 µm) so that it is learnable from the
  image, with a Poisson library size of about ``--umis`` UMIs per tissue bin (a few on glass); nothing of
  size N x genes is ever dense. Only the files spatialdata-io 0.7.1 reads are written (see
  ``genedml_sd.datasets._layouts.visium_hd``).
* stages, each timed, with the peak anonymous RSS (``RssAnon`` sampled every 20 ms) and the kernel's
  ``VmHWM``: ``read`` (``gd.io.visium_hd(bin_size=8, fullres_image_file=...)``), ``aggregate``
  (``gd.pp.aggregate_bins`` to 16 µm; the observations stay the 8 µm bins), ``features``
  (``gd.encoders.extract_features(mode=--feature-mode)`` with the offline ``stain-texture`` encoder, fresh
  cache; encoder calls per observation = ``n_encoded_tiles / N``), ``fit`` (``gd.tl.fit``: Gene-DML,
  ``--epochs`` epochs over all bins, no validation slide, features from the cache of ``features``) and
  ``predict`` (``gd.tl.predict`` over all bins, features from that cache, the table added to the
  SpatialData). ``--feature-mode auto`` is resolved by ``gd.tl.choose_feature_mode`` as ``fit`` does.
* grid predict, with the model trained at the smallest size: ``read`` (``gd.io.her2st`` of a real section,
  full-resolution H&E), ``spot_grid`` (``gd.pp.tissue_mask``, then ``gd.pp.spot_grid`` on a square lattice
  whose spacing is corrected until it gives about ``--grid-spots`` spots), ``features`` (the model's
  features of the grid, fresh cache) and ``predict`` (``gd.tl.predict`` from that cache); the goal is
  on ``features + predict``, what ``gd.tl.predict`` costs on a new image.

Prints a table and the goals (issue "Platform scale") with pass / fail, and writes
``benchmarks/results/platform_scale[_<sizes>][_<mode>].json`` (or ``--out``). Runs unchanged on a GPU.

    python benchmarks/platform_scale.py                                # 10^4, 10^5, 10^6 bins + 10^5 grid spots
    python benchmarks/platform_scale.py --sizes 10000 --grid-spots 5000 --feature-mode lattice   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import HER2ST, RESULTS, Stages, device_info, markdown_table, reflect_indices, run_child, sparse_umi_counts

BIN_UM = 8.0
MARGIN_UM = 120.0
"""Image beyond the capture area on every side, µm."""
GLASS_OD = 0.22
"""Optical density (summed over RGB) of the glass of the HER2ST scans; bins above it hold tissue."""
N_LEVELS = 32
"""Stain levels the per-bin gene profiles are quantised to."""
STAIN_BETA = 0.8
"""Log-fold change of a gene with loading 1 per standard deviation of local stain."""
GOALS = {"flat_ratio": 2.0, "calls_per_obs": 0.05, "rss_gib_1e6": 8.0, "epoch_min_1e5": 10.0, "grid_min": 5.0}


# --------------------------------------------------------------------------------------------- layout
def load_section(root: Path, section: str) -> dict:
    """A real HER2ST section: full-resolution H&E, µm/px, spot centres (px) and counts (spots x genes)."""
    import pandas as pd
    from PIL import Image

    index = pd.read_csv(root / "sections.csv", index_col="section")
    if section not in index.index or not bool(index.loc[section, "has_image"]):
        raise SystemExit(f"Section {section!r} has no image in {root / 'sections.csv'}.")
    row = index.loc[section]
    if row["image_kind"] != "original_jpeg":
        raise SystemExit(f"Section {section!r} has no full-resolution H&E (image kind {row['image_kind']!r}).")
    Image.MAX_IMAGE_PIXELS = None
    rgb = np.asarray(Image.open(root / row["image_path"]).convert("RGB"))
    spots = pd.read_csv(root / row["spotfile_path"], sep="\t")
    counts = pd.read_csv(root / row["counts_path"], sep="\t", index_col=0)
    return {
        "rgb": rgb,
        "um_per_px": float(row["um_per_px_image"]),
        "spots_xy": spots[["pixel_x", "pixel_y"]].to_numpy(np.float64) * float(row["coord_to_image_scale_x"]),
        "counts": counts,
    }


def gene_profile(counts, n_genes: int) -> tuple[list[str], np.ndarray]:
    """The ``n_genes`` most expressed genes of a section and their pseudo-bulk share (sums to 1)."""
    totals = counts.sum(axis=0).sort_values(ascending=False, kind="stable")[:n_genes]
    return [str(g) for g in totals.index], (totals / totals.sum()).to_numpy(np.float64)


def bin_stain(image: np.ndarray, margin_px: float, side: int, um_per_px: float) -> np.ndarray:
    """Optical density (summed over RGB) of each 8 µm bin, (side, side), row-major like the bins."""
    from PIL import Image

    extent = side * BIN_UM / um_per_px
    box = (margin_px, margin_px, margin_px + extent, margin_px + extent)
    mean = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX, box=box), dtype=np.float64)
    return -np.log10((mean + 1.0) / 256.0).sum(axis=2)


def simulate_counts(od: np.ndarray, profile: np.ndarray, umis: float, rng) -> tuple[object, dict, np.ndarray]:
    """Counts of the bins from their optical density ``od`` (side, side): CSR int32 (side**2, n_genes), row-major.

    Gene ``g`` of a bin with standardised local stain ``z`` has probability ``profile[g] * exp(STAIN_BETA *
    loading[g] * z)`` (renormalised; ``z`` quantised to ``N_LEVELS`` levels in [-2.5, 2.5]); returns the
    counts, summary statistics and the loadings (n_genes,).
    """
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(od, sigma=3.0)  # ~24 µm: cell neighbourhoods, what a 112 µm tile sees
    tissue = np.clip((smooth - GLASS_OD) / 0.12, 0.0, 1.0)  # HER2ST glass 0.19-0.23, loose stroma 0.25, tumour > 0.6
    on = tissue > 0.5
    ref = smooth[on] if on.sum() > 10 else smooth.ravel()
    z = np.clip((0.5 * od + 0.5 * smooth - ref.mean()) / (ref.std() + 1e-9), -2.5, 2.5).ravel()
    loadings = rng.standard_normal(len(profile))
    centres = np.linspace(-2.5, 2.5, N_LEVELS)
    level = np.clip(np.round((z + 2.5) / 5.0 * (N_LEVELS - 1)), 0, N_LEVELS - 1).astype(np.int64)
    p = profile[None] * np.exp(STAIN_BETA * loadings[None] * centres[:, None])
    cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    mu = 2.0 + umis * tissue.ravel() * np.exp(0.3 * z)
    library = 1 + rng.poisson(mu)
    x = sparse_umi_counts(library, level, cdf, rng)
    stats = {
        "tissue_fraction": float(on.mean()),
        "umis_per_bin_median": float(np.median(library)),
        "umis_per_tissue_bin_median": float(np.median(library[on.ravel()])) if on.any() else 0.0,
        "genes_per_bin_median": float(np.median(np.diff(x.indptr))),
    }
    return x, stats, loadings


def write_layout(work: Path, n_obs: int, *, root: Path, section: str, n_genes: int, umis: float, seed: int) -> dict:
    """Write ``work/outs`` (8 µm bins only) and ``work/microscope.tif``; return what was written."""
    import h5py
    import pandas as pd
    from PIL import Image

    from genedml_sd.datasets._layouts.tenx import write_10x_h5, write_pyramid_tiff

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    src = load_section(root, section)
    um = src["um_per_px"]
    side = math.ceil(math.sqrt(n_obs))
    n = side * side
    margin_px = MARGIN_UM / um
    size_px = math.ceil((side * BIN_UM + 2 * MARGIN_UM) / um)
    # tissue region: the spots' bounding box plus one spot pitch (200 µm); mirrored where the image must be larger
    h0, w0 = src["rgb"].shape[:2]
    pad = 200.0 / um
    lo = np.maximum(np.floor(src["spots_xy"].min(axis=0) - pad), 0).astype(int)
    hi = np.minimum(np.ceil(src["spots_xy"].max(axis=0) + pad), [w0, h0]).astype(int)
    centre = np.median(src["spots_xy"], axis=0).round().astype(int)
    x0, y0 = int(centre[0] - size_px // 2), int(centre[1] - size_px // 2)
    xs = reflect_indices(x0, size_px, int(lo[0]), int(hi[0]))
    ys = reflect_indices(y0, size_px, int(lo[1]), int(hi[1]))
    image = np.ascontiguousarray(src["rgb"][ys][:, xs])
    genes, profile = gene_profile(src["counts"], n_genes)
    del src

    od = bin_stain(image, margin_px, side, um)
    x, stats, _ = simulate_counts(od, profile, umis, rng)
    rows, cols = np.divmod(np.arange(n), side)
    barcodes = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]

    outs = work / "outs"
    folder = outs / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    write_10x_h5(
        folder / "filtered_feature_bc_matrix.h5", x, barcodes, genes, library_id="platform_hd", chemistry="Visium HD v1"
    )
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": np.ones(n, dtype=np.int32),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": margin_px + (rows + 0.5) * BIN_UM / um,
            "pxl_col_in_fullres": margin_px + (cols + 0.5) * BIN_UM / um,
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    hires_scalef = min(1.0, 2000.0 / size_px)
    sf = {
        "spot_diameter_fullres": BIN_UM / um,
        "bin_size_um": BIN_UM,
        "microns_per_pixel": um,
        "regist_target_img_scalef": hires_scalef,
        "tissue_lowres_scalef": hires_scalef / 3.3,
        "fiducial_diameter_fullres": 40.0 / um,
        "tissue_hires_scalef": hires_scalef,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
    pil = Image.fromarray(image)
    for name, scalef in (("hires", hires_scalef), ("lowres", hires_scalef / 3.3)):
        px = max(1, round(size_px * scalef))
        pil.resize((px, px), Image.Resampling.BOX).save(outs / "spatial" / f"tissue_{name}_image.png", compress_level=1)
    del pil
    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1], "num_row": side, "num_col": side}
    with h5py.File(outs / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout), "transform_matrices": {}})
    n_sub = max(1, math.ceil(math.log2(max(size_px, 2048) / 1024)))
    write_pyramid_tiff(work / "microscope.tif", image, n_sub=n_sub, tile=256, resolution_um=um)
    files = [p for p in work.rglob("*") if p.is_file()]
    return {
        "n_bins": n,
        "side_bins": side,
        "capture_mm": side * BIN_UM / 1000,
        "n_genes": n_genes,
        "nnz": int(x.nnz),
        "total_umis": int(x.sum()),
        **stats,
        "section": section,
        "um_per_px": um,
        "image_px": [size_px, size_px],
        "crop_origin_px": [x0, y0],
        "image_levels": n_sub + 1,
        "mirrored": bool(x0 < lo[0] or y0 < lo[1] or x0 + size_px > hi[0] or y0 + size_px > hi[1]),
        "disk_mb": sum(p.stat().st_size for p in files) / 1e6,
        "write_seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------- measuring children
def _device(arg: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if arg == "auto" else arg


def _warm_imports() -> float:
    """Import what the stages import lazily (a one-off cost of the process, not of a stage); seconds taken."""
    import importlib

    t0 = time.perf_counter()
    for name in ("torch", "spatialdata", "spatialdata_io", "geopandas", "shapely", "dask.array", "lightning.pytorch"):
        importlib.import_module(name)
    try:  # dask imports it when it first picks a scheduler
        importlib.import_module("distributed")
    except ImportError:
        pass
    return time.perf_counter() - t0


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def measure_size(work: Path, args: argparse.Namespace) -> dict:
    """The five stages on the layout in ``work`` (this process is fresh); saves the model to ``work/model``."""
    import warnings

    warnings.filterwarnings("ignore")
    import genedml_sd as gd
    from genedml_sd.encoders import extract_features, load_encoder
    from genedml_sd.tiling import TileGeometry

    import_seconds = _warm_imports()
    gd.settings.progress = False
    device = _device(args.device)
    cache = work / "features"
    shutil.rmtree(cache, ignore_errors=True)  # fresh: the features stage must encode
    stages = Stages()
    with stages("read"):
        sdata = gd.io.visium_hd(work / "outs", bin_size=8, fullres_image_file=work / "microscope.tif")
    bins_key = next(k for k in sdata.shapes if k.endswith("square_008um"))
    table_key = "table"
    n = int(sdata.tables[table_key].n_obs)
    with stages("aggregate"):
        gd.pp.aggregate_bins(sdata, bins_key, size_um=16)
    n16 = int(len(sdata[f"{bins_key}_16um"]))
    enc = load_encoder("stain-texture")
    with stages("features"):
        mode = args.feature_mode
        if mode == "auto":  # as gd.tl.fit resolves it (Gene-DML reads neighbour tokens)
            image_key = next(iter(sdata.images))
            mode, _ = gd.tl.choose_feature_mode(mode, [(sdata, image_key, bins_key)], TileGeometry(), neighbours=True)
        feats = extract_features(sdata, enc, shapes_key=bins_key, mode=mode, device=device, cache_dir=cache)
    calls = feats.n_encoded_tiles
    del feats
    fitted = args.use_model is None
    n_batches = -(-n // 256)  # gd.tl.fit's batch_size
    fit_batches = min(n_batches, args.fit_batches) if args.fit_batches else n_batches
    if not fitted:  # this size predicts with a model trained at a smaller size (--fit-sizes)
        model = gd.tl.TrainedModel.load(args.use_model)
    else:
        with stages("fit"):
            model = gd.tl.fit(
                sdata,
                shapes_key=bins_key,
                table_key=table_key,
                genes=args.genes,
                encoder=enc,
                method="gene-dml",
                max_epochs=args.epochs,
                val_sections=None,
                seed=args.seed,
                accelerator="gpu" if device.startswith("cuda") else "cpu",
                devices=1,
                extraction_device=device,
                feature_mode=args.feature_mode,
                cache_dir=str(cache),
                trainer_kwargs={"limit_train_batches": fit_batches} if fit_batches < n_batches else None,
                **_overrides(args.set),
            )
    with stages("predict"):
        gd.tl.predict(sdata, model, shapes_key=bins_key, encoder=enc, cache_dir=str(cache), device=device)
    pred = sdata.tables["gd_predictions"]
    assert pred.n_obs == n and pred.n_vars == len(model.genes), (pred.shape, n)
    if fitted:
        model.save(work / "model", overwrite=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "n_obs": n,
        "n_pseudo_spots_16um": n16,
        "feature_mode": mode,
        "fit_feature_mode": model.features.mode,
        "encoder_calls": int(calls) if calls is not None else None,
        "encoder_calls_per_obs": None if calls is None else calls / n,
        "fitted": fitted,
        "fit_batches": fit_batches if fitted else None,
        "fit_batches_per_epoch": n_batches,
        "fit_observations": min(n, 256 * fit_batches) if fitted else None,
        "training_seconds": float(model.training["seconds"]) if fitted else None,
        "import_seconds": import_seconds,
        "epochs": int(model.training["epochs"]),
        "stages": stages.rows,
        "peak_anon_mb": stages.peak_anon_mb,
        "vm_hwm_mb": stages.rows[-1]["vm_hwm_mb"],
    }


def measure_grid(model_dir: Path, args: argparse.Namespace) -> dict:
    """Spot grid of about ``args.grid_spots`` spots over a real HER2ST section, then predict (fresh cache)."""
    import warnings

    warnings.filterwarnings("ignore")
    import genedml_sd as gd
    from genedml_sd.encoders import load_encoder

    import_seconds = _warm_imports()
    gd.settings.progress = False
    device = _device(args.device)
    model = gd.tl.TrainedModel.load(model_dir)
    enc = load_encoder(model.encoder.name)
    stages = Stages()
    with stages("read"):
        sdata = gd.io.her2st(args.root, args.section)
    image_key = f"{args.section}_he"
    with stages("spot_grid"):
        gd.pp.tissue_mask(sdata, image_key, key_added="tissue")
        um = gd.io.get_pixel_size(sdata, image_key)
        h, w = sdata[image_key]["scale0"]["image"].shape[1:]
        spacing = math.sqrt(0.35 * h * w * um**2 / args.grid_spots)  # first guess: a third of the image is tissue
        for _ in range(3):  # n ~ 1 / spacing**2: correct the spacing from the spots the grid has
            gd.pp.spot_grid(
                sdata,
                image_key,
                spacing_um=spacing,
                diameter_um=min(55.0, spacing),
                lattice="square",
                mask="tissue",
                key_added="grid",
                overwrite=True,
            )
            used, n_now = spacing, len(sdata["grid"])
            if abs(n_now / args.grid_spots - 1) < 0.02:
                break
            spacing *= math.sqrt(n_now / args.grid_spots)
    n = int(len(sdata["grid"]))
    cache = Path(tempfile.mkdtemp(prefix="gd-grid-"))
    try:
        with stages("features"):  # what predict does first, timed on its own (fresh cache)
            feats = model.features.extract(
                sdata, enc, image_key=image_key, shapes_key="grid", cache_dir=str(cache), device=device
            )
        calls = feats.n_encoded_tiles
        del feats
        with stages("predict"):  # the model over all spots, features from the cache just written
            gd.tl.predict(
                sdata, model, image_key=image_key, shapes_key="grid", encoder=enc, cache_dir=str(cache), device=device
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert sdata.tables["gd_predictions"].n_obs == n
    return {
        "section": args.section,
        "n_spots": n,
        "spacing_um": float(used),
        "image_px": [int(h), int(w)],
        "feature_mode": model.features.mode,
        "import_seconds": import_seconds,
        "encoder_calls_per_spot": None if calls is None else calls / n,
        "predict_seconds": sum(r["seconds"] for r in stages.rows if r["stage"] in ("features", "predict")),
        "stages": stages.rows,
        "peak_anon_mb": stages.peak_anon_mb,
        "vm_hwm_mb": stages.rows[-1]["vm_hwm_mb"],
    }


# --------------------------------------------------------------------------------------------- goals and report
def _per_obs(results: dict) -> dict[str, dict[int, float]]:
    """Seconds per observation of every stage, by size."""
    out: dict[str, dict[int, float]] = {}
    for n, res in results.items():
        for row in res["stages"]:
            out.setdefault(row["stage"], {})[int(n)] = row["seconds"] / _stage_obs(res, row["stage"])
    return out


def _stage_obs(res: dict, stage: str) -> int:
    """Observations a stage processed: all, except a fit limited to ``--fit-batches`` batches of the epoch."""
    if stage == "fit" and res.get("fit_observations"):
        return int(res["fit_observations"])
    return int(res["n_obs"])


def goals(results: dict, grid: dict | None) -> list[dict]:
    """The issue's goals with the measured values and pass / fail (``None`` when the run cannot tell)."""
    rows = []
    sizes = sorted(int(n) for n in results)
    for stage, by_size in _per_obs(results).items():
        if len(by_size) < 2:
            rows.append({"goal": f"{stage}: s/obs flat within 2x", "measured": "one size only", "pass": None})
            continue
        # growth: s/obs at each size over s/obs at the smallest; a fall (fixed costs amortised) is not a failure
        n0 = min(by_size)
        growth = max(v / by_size[n0] for v in by_size.values())
        spread = max(by_size.values()) / min(by_size.values())
        full = n0 <= 10_000 and max(by_size) >= 1_000_000
        ok = growth <= GOALS["flat_ratio"]
        rows.append(
            {
                "goal": f"{stage}: s/obs flat within {GOALS['flat_ratio']:g}x from 1e4 to 1e6",
                "measured": f"growth {growth:.2f}x, spread {spread:.2f}x over {n0:.0e}-{max(by_size):.0e}",
                "growth": growth,
                "spread": spread,
                "pass": (ok if full else None) if ok else False,
            }
        )
    calls = {n: results[str(n)]["encoder_calls_per_obs"] for n in sizes}
    worst = max((c for c in calls.values() if c is not None), default=None)
    rows.append(
        {
            "goal": f"encoder calls per observation <= {GOALS['calls_per_obs']:g} at 8 µm bins",
            "measured": "unknown"
            if worst is None
            else f"max {worst:.3g} ({', '.join(f'{c:.3g}' for c in calls.values())})",
            "pass": None if worst is None else worst <= GOALS["calls_per_obs"],
        }
    )
    big = max(sizes)
    peak_gib = results[str(big)]["peak_anon_mb"] / 1024
    rows.append(
        {
            "goal": f"peak anonymous RSS < {GOALS['rss_gib_1e6']:g} GiB at 1e6 observations",
            "measured": f"{peak_gib:.2f} GiB at {big:.0e} (VmHWM {results[str(big)]['vm_hwm_mb'] / 1024:.2f} GiB)",
            "pass": (peak_gib < GOALS["rss_gib_1e6"]) if big >= 1_000_000 else None,
        }
    )
    at = next((n for n in sizes if 100_000 <= n < 1_000_000 and results[str(n)]["fitted"]), None)
    if at is None:
        rows.append({"goal": "one epoch of Gene-DML on 1e5 observations < 10 min", "measured": "not run", "pass": None})
    else:
        res = results[str(at)]
        fit = next(r["seconds"] for r in res["stages"] if r["stage"] == "fit")
        if res.get("fit_batches") and res["fit_batches"] < res["fit_batches_per_epoch"]:  # a part of the epoch
            fit *= res["fit_batches_per_epoch"] / res["fit_batches"]
        rows.append(
            {
                "goal": f"one epoch of Gene-DML on 1e5 observations < {GOALS['epoch_min_1e5']:g} min (fit stage)",
                "measured": f"{fit / 60:.2f} min (training loop {results[str(at)]['training_seconds'] / 60:.2f} min)",
                "pass": fit / 60 < GOALS["epoch_min_1e5"],
            }
        )
    if grid is None:
        rows.append(
            {"goal": "predict on 1e5 grid spots of a real HER2ST H&E < 5 min", "measured": "not run", "pass": None}
        )
    else:
        sec = grid["predict_seconds"]
        rows.append(
            {
                "goal": f"predict on 1e5 grid spots of a real HER2ST H&E < {GOALS['grid_min']:g} min (features + model)",
                "measured": f"{sec / 60:.2f} min for {grid['n_spots']:,} spots",
                "pass": (sec / 60 < GOALS["grid_min"]) if grid["n_spots"] >= 95_000 else None,
            }
        )
    return rows


def _table(results: dict, grid: dict | None) -> list[dict]:
    rows = []
    for _, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        for r in res["stages"]:
            rows.append(
                {
                    "observations": f"{res['n_obs']:,}",
                    "stage": r["stage"],
                    "seconds": r["seconds"],
                    "µs / obs": 1e6 * r["seconds"] / _stage_obs(res, r["stage"]),
                    "peak anon MiB": r["peak_anon_mb"],
                    "VmHWM MiB": r["vm_hwm_mb"],
                }
            )
    if grid is not None:
        for r in grid["stages"]:
            rows.append(
                {
                    "observations": f"{grid['n_spots']:,} grid spots",
                    "stage": r["stage"],
                    "seconds": r["seconds"],
                    "µs / obs": 1e6 * r["seconds"] / grid["n_spots"],
                    "peak anon MiB": r["peak_anon_mb"],
                    "VmHWM MiB": r["vm_hwm_mb"],
                }
            )
    return rows


def _child_args(args: argparse.Namespace) -> list[str]:
    argv = [__file__, "--root", str(args.root), "--section", args.section, "--feature-mode", args.feature_mode]
    argv += ["--epochs", str(args.epochs), "--genes", str(args.genes), "--layout-genes", str(args.layout_genes)]
    argv += ["--umis", str(args.umis), "--seed", str(args.seed), "--device", args.device]
    argv += ["--grid-spots", str(args.grid_spots), "--fit-batches", str(args.fit_batches)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="observations (bins)")
    p.add_argument("--feature-mode", default="auto", help="feature_mode of extract_features / fit")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--genes", type=int, default=250, help="genes the model predicts (gd.tl.fit genes=)")
    p.add_argument("--layout-genes", type=int, default=300, help="genes in the simulated counts")
    p.add_argument("--umis", type=float, default=100.0, help="mean UMIs of a tissue bin")
    p.add_argument("--grid-spots", type=int, default=100_000, help="grid spots for the grid predict (0: skip)")
    p.add_argument("--root", type=Path, default=HER2ST, help="HER2ST folder (sections.csv)")
    p.add_argument("--section", default="B4", help="HER2ST section with a full-resolution H&E")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Gene-DML config override")
    p.add_argument("--workdir", type=Path, default=None, help="where layouts are written (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the written layouts")
    p.add_argument(
        "--out", type=Path, default=None, help="result JSON (default benchmarks/results/platform_scale*.json)"
    )
    p.add_argument(
        "--fit-sizes",
        type=int,
        nargs="*",
        default=None,
        help="sizes at which to fit (default all); the others predict with the model of the last fitted size",
    )
    p.add_argument(
        "--fit-batches",
        type=int,
        default=0,
        help="time at most this many training batches of the epoch (0: the whole epoch); s/obs of fit is then "
        "over the observations of those batches",
    )
    p.add_argument("--use-model", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: write:N:DIR, size:DIR, grid:DIR
    args = p.parse_args()

    if args.child:
        kind, _, rest = args.child.partition(":")
        if kind == "write":
            n, _, folder = rest.partition(":")
            res = write_layout(
                Path(folder),
                int(n),
                root=args.root,
                section=args.section,
                n_genes=args.layout_genes,
                umis=args.umis,
                seed=args.seed,
            )
        elif kind == "size":
            res = measure_size(Path(rest), args)
        else:
            res = measure_grid(Path(rest), args)
        print("RESULT " + json.dumps(res, default=float))
        return

    t_start = time.perf_counter()
    load = os.getloadavg()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="gd-platform-"))
    base.mkdir(parents=True, exist_ok=True)
    results, layouts, grid = {}, {}, None
    model_dir = latest = None
    try:
        for n in sorted(args.sizes):
            work = base / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            layouts[str(n)] = run_child([*_child_args(args), "--child", f"write:{n}:{work}"])
            lay = layouts[str(n)]
            print(
                f"layout {lay['n_bins']:,} bins ({lay['capture_mm']:.2f} mm, image {lay['image_px'][0]:,} px"
                f"{', mirrored' if lay['mirrored'] else ''}): {lay['nnz']:,} stored counts, median "
                f"{lay['umis_per_tissue_bin_median']:.0f} UMIs / tissue bin, {lay['disk_mb']:.0f} MB, "
                f"written in {lay['write_seconds']:.0f} s",
                flush=True,
            )
            fit_here = not args.fit_sizes or n in args.fit_sizes or latest is None
            use = [] if fit_here else ["--use-model", str(latest)]
            results[str(n)] = res = run_child([*_child_args(args), *use, "--child", f"size:{work}"])
            res["layout"] = lay
            print(
                "  "
                + ", ".join(f"{r['stage']} {r['seconds']:.1f} s" for r in res["stages"])
                + f"; encoder calls / obs {res['encoder_calls_per_obs']:.3g}; peak anon {res['peak_anon_mb']:.0f} MiB",
                flush=True,
            )
            if fit_here:
                latest = base / f"model_n{n}"
                shutil.copytree(work / "model", latest, dirs_exist_ok=True)
                model_dir = model_dir or latest
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        if args.grid_spots > 0 and model_dir is not None:
            grid = run_child([*_child_args(args), "--child", f"grid:{model_dir}"])
            print(f"grid predict: {grid['n_spots']:,} spots, {grid['predict_seconds']:.1f} s", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    dev = device_info()
    dev["device"] = _device(args.device)
    dev["loadavg_at_start"] = list(load)
    dev["loadavg_at_end"] = list(os.getloadavg())  # the CPU may be shared: timings scale with the load
    goal_rows = goals(results, grid)
    cols = ["observations", "stage", "seconds", "µs / obs", "peak anon MiB", "VmHWM MiB"]
    print(
        f"\nVisium HD platform scale, feature mode {args.feature_mode!r}, device {dev['device']} "
        f"({dev['cpu_count']} CPUs, load {load[0]:.1f} at start), {args.epochs} epoch(s)"
    )
    print(markdown_table(_table(results, grid), cols))
    print()
    verdict = {True: "pass", False: "FAIL", None: "n/a"}
    print(markdown_table([{**g, "pass": verdict[g["pass"]]} for g in goal_rows], ["goal", "measured", "pass"]))
    payload = {
        "device": dev,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "feature_mode": args.feature_mode,
        "encoder": "stain-texture",
        "bin_um": BIN_UM,
        "sizes": results,
        "seconds_per_obs": {s: {str(n): v for n, v in d.items()} for s, d in _per_obs(results).items()},
        "grid": grid,
        "goals": goal_rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    if args.out is None:
        default = sorted(args.sizes) == [10_000, 100_000, 1_000_000]
        name = "platform_scale" + ("" if default else "_" + "-".join(str(n) for n in sorted(args.sizes)))
        name += "" if args.feature_mode == "auto" else f"_{args.feature_mode}"
        args.out = RESULTS / f"{name}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
