"""Per-spot vs lattice vs dense features, and exact vs bounded global context: encoder calls and PCC(A), in one run.

For each feature mode (``gd.encoders.extract_features(..., mode=...)``: ``spot``, ``lattice``,
``dense``) and each HER2ST section with an image: encoder calls (tiles) per spot and extraction
seconds (fresh cache), then leave-one-patient-out cross-validation of Gene-DML on those features
(``feature_mode`` of ``gd.tl.cross_validate``). Then, on the lattice features, Gene-DML with a
bounded slide context (``context_size``, e.g. 128 spots, far fewer than a section's 180-350, so the
approximation is exercised; the default of 1024 gives HER2ST sections the exact attention). Goals:
the lattice mode needs at least 4x fewer encoder calls with a mean PCC(A) within 0.01 of the
per-spot mode; the bounded context keeps PCC(A) within the fold-to-fold sd of the exact one.

    python benchmarks/lattice_mode.py [--encoder stain-texture] [--epochs 12] [--genes 250] [--context-sizes 128]
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

MODES = ("spot", "lattice", "dense")


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
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--context-sizes", nargs="*", type=int, default=[128], help="bounded global contexts to run on lattice features"
    )
    args = p.parse_args()

    gd.settings.progress = False
    index = pd.read_csv(HER2ST / "sections.csv", index_col="section")
    names = args.sections or [str(s) for s in index.index[index["has_image"].astype(bool)]]
    slides = [gd.io.her2st(HER2ST, s) for s in names]
    encoder = load_encoder(args.encoder, pretrained=not args.random_init)
    has_mode = "feature_mode" in inspect.signature(gd.tl.cross_validate).parameters
    if not args.no_cv and not has_mode:
        print("gd.tl.cross_validate has no feature_mode argument yet: PCC(A) skipped")

    def cv_row(row: dict, mode: str, cache_dir: str, **overrides) -> None:
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
            **overrides,
        )
        folds = cv[~cv["fold"].isin(["mean", "sd"])]
        row["pcc_a"] = float(folds["pcc_a"].mean())
        row["pcc_a_sd"] = float(folds["pcc_a"].std(ddof=1))
        row["pcc_h"] = float(folds["pcc_h"].mean())
        row["pcc_a_folds"] = [float(v) for v in folds["pcc_a"]]
        row["train_s"] = float(folds["train_seconds"].sum())
        row["cv_s"] = time.perf_counter() - t0

    per_section, summary, context = [], [], []
    with tempfile.TemporaryDirectory(prefix="gd-lattice-bench-") as cache_dir:
        for mode in args.modes:
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
                cv_row(row, mode, cache_dir)
            summary.append(row)
            print(row, flush=True)
        if not args.no_cv and has_mode and "lattice" in args.modes:
            exact = next(r for r in summary if r["mode"] == "lattice")
            context.append(
                {"context": "exact (all spots)", **{k: exact[k] for k in exact if k.startswith(("pcc", "train"))}}
            )
            for size in args.context_sizes:
                row = {"context": f"{size} spots"}
                cv_row(row, "lattice", cache_dir, context_size=size)
                context.append(row)
                print(row, flush=True)

    by_mode = {r["mode"]: r for r in summary}
    verdict: dict = {}
    spot = by_mode.get("spot", summary[0])
    for mode, r in by_mode.items():
        if mode == "spot" or "spot" not in by_mode:
            continue
        verdict[f"{mode}_calls_reduction"] = spot["calls_per_spot"] / r["calls_per_spot"]
        verdict[f"{mode}_extract_speedup"] = spot["extract_s_total"] / r["extract_s_total"]
        if "pcc_a" in spot:
            verdict[f"{mode}_delta_pcc_a"] = r["pcc_a"] - spot["pcc_a"]
    if "lattice_delta_pcc_a" in verdict:
        verdict["goal_met"] = bool(
            verdict["lattice_calls_reduction"] >= 4 and abs(verdict["lattice_delta_pcc_a"]) <= 0.01
        )
    if len(context) > 1:
        sd = context[0]["pcc_a_sd"]
        verdict["context_delta_pcc_a"] = {c["context"]: c["pcc_a"] - context[0]["pcc_a"] for c in context[1:]}
        verdict["context_within_fold_sd"] = bool(all(abs(d) <= sd for d in verdict["context_delta_pcc_a"].values()))

    print(f"\nEncoder {encoder.name}; {len(names)} sections {names}; {args.epochs} epochs, {args.genes} genes")
    cols = ["mode", "sections", "spots", "calls_per_spot", "extract_s_per_section", "extract_s_total"]
    cols += [c for c in ("pcc_a", "pcc_a_sd", "pcc_h", "cv_s") if c in spot]
    print(markdown_table(summary, cols))
    if context:
        print()
        print(markdown_table(context, ["context", "pcc_a", "pcc_a_sd", "pcc_h", "train_s"]))
    print()
    print(markdown_table(per_section, ["mode", "section", "n_spots", "calls_per_spot", "seconds"]))
    print(f"\n{verdict}; peak host RSS {peak_rss_mb():.0f} MB")
    path = save(
        "lattice_mode",
        {
            "summary": summary,
            "context": context,
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
