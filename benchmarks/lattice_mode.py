"""Per-spot vs slide-lattice neighbour features: encoder calls, extraction time and PCC(A), in one run.

For each feature mode (``gd.encoders.extract_features(..., mode=...)``) and each HER2ST section
with an image: encoder calls (tiles) per spot and extraction seconds (fresh cache), then
leave-one-patient-out cross-validation of Gene-DML on those features (``feature_mode`` of
``gd.tl.cross_validate``). Goal: the lattice mode needs at least 4x fewer encoder calls with a
mean PCC(A) within 0.01 of the per-spot mode.

    python benchmarks/lattice_mode.py [--encoder stain-texture] [--epochs 12] [--genes 250]
    python benchmarks/lattice_mode.py --sections B4 C2 C3 --epochs 1 --genes 20   # quick check
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time

import numpy as np
import pandas as pd
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, save

import genedml_sd as gd
from genedml_sd.encoders import extract_features, load_encoder

MODES = ("spot", "lattice")


def extract_all(slides, names, encoder, mode: str, cache_dir: str, num_workers: int | None) -> list[dict]:
    """Extract (and cache) the neighbour features of every slide with ``mode``; one row per slide."""
    rows = []
    for name, sdata in zip(names, slides, strict=True):
        t0 = time.perf_counter()
        feats = extract_features(sdata, encoder, mode=mode, cache_dir=cache_dir, num_workers=num_workers)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "mode": mode,
                "section": name,
                "n_spots": feats.n_spots,
                "encoder_calls": feats.n_encoded_tiles,
                "calls_per_spot": feats.encoded_tiles_per_spot,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="stain-texture")
    p.add_argument("--random-init", action="store_true", help="random-init weights (timm encoders)")
    p.add_argument("--sections", nargs="+", default=None, help="default: every section with an image")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-cv", action="store_true", help="only encoder calls and time, no PCC(A)")
    args = p.parse_args()

    gd.settings.progress = False
    index = pd.read_csv(HER2ST / "sections.csv", index_col="section")
    names = args.sections or [str(s) for s in index.index[index["has_image"].astype(bool)]]
    slides = [gd.io.her2st(HER2ST, s) for s in names]
    encoder = load_encoder(args.encoder, pretrained=not args.random_init)
    has_mode = "feature_mode" in inspect.signature(gd.tl.cross_validate).parameters
    if not args.no_cv and not has_mode:
        print("gd.tl.cross_validate has no feature_mode argument yet: PCC(A) skipped")

    per_section, summary = [], []
    with tempfile.TemporaryDirectory(prefix="gd-lattice-bench-") as cache_dir:
        for mode in MODES:
            rows = extract_all(slides, names, encoder, mode, cache_dir, args.num_workers)
            per_section += rows
            n_spots = sum(r["n_spots"] for r in rows)
            row = {
                "mode": mode,
                "sections": len(rows),
                "spots": n_spots,
                "calls_per_spot": sum(r["encoder_calls"] for r in rows) / n_spots,
                "extract_s_per_section": float(np.mean([r["seconds"] for r in rows])),
                "extract_s_total": float(sum(r["seconds"] for r in rows)),
            }
            if not args.no_cv and has_mode:
                t0 = time.perf_counter()
                cv = gd.tl.cross_validate(
                    slides,
                    method="gene-dml",
                    encoder=encoder,
                    pretrained=not args.random_init,
                    genes=args.genes,
                    max_epochs=args.epochs,
                    cache_dir=cache_dir,  # the features extracted above, never recomputed
                    num_workers=args.num_workers,
                    feature_mode=mode,
                )
                folds = cv[~cv["fold"].isin(["mean", "sd"])]
                row["pcc_a"] = float(folds["pcc_a"].mean())
                row["pcc_a_sd"] = float(folds["pcc_a"].std(ddof=1))
                row["pcc_h"] = float(folds["pcc_h"].mean())
                row["cv_s"] = time.perf_counter() - t0
            summary.append(row)
            print(row, flush=True)

    spot, lattice = summary
    verdict = {"calls_reduction": spot["calls_per_spot"] / lattice["calls_per_spot"]}
    verdict["extract_speedup"] = spot["extract_s_total"] / lattice["extract_s_total"]
    if "pcc_a" in spot:
        verdict["delta_pcc_a"] = lattice["pcc_a"] - spot["pcc_a"]
        verdict["goal_met"] = bool(verdict["calls_reduction"] >= 4 and abs(verdict["delta_pcc_a"]) <= 0.01)

    print(f"\nEncoder {encoder.name}; {len(names)} sections {names}; {args.epochs} epochs, {args.genes} genes")
    cols = ["mode", "sections", "spots", "calls_per_spot", "extract_s_per_section", "extract_s_total"]
    cols += [c for c in ("pcc_a", "pcc_a_sd", "pcc_h", "cv_s") if c in spot]
    print(markdown_table(summary, cols))
    print()
    print(markdown_table(per_section, ["mode", "section", "n_spots", "calls_per_spot", "seconds"]))
    print(f"\n{verdict}; peak host RSS {peak_rss_mb():.0f} MB")
    path = save(
        "lattice_mode",
        {
            "summary": summary,
            "per_section": per_section,
            "verdict": verdict,
            "encoder": encoder.name,
            "encoder_fingerprint": encoder.fingerprint,
            "sections": names,
            "epochs": args.epochs,
            "genes": args.genes,
            "device": device_info(),
            "peak_rss_mb": peak_rss_mb(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
