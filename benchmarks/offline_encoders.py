"""The offline encoders side by side: same methods, folds and genes, leave-one-patient-out on HER2ST.

For each encoder (default ``stain-texture`` and ``stain-texture-nuclei``) and each method (default the
local-tile methods ridge, MLP and BLEEP, which need one encoded tile per spot), cross-validates on the
HER2ST sections with images, then compares the encoders method by method with
:func:`genedml_sd.tl.compare_methods` (difference of PCC(A), 95 % bootstrap interval over test spots,
Wilcoxon test over genes). Also times feature extraction per encoder. Nothing is tuned.

    python benchmarks/offline_encoders.py
    python benchmarks/offline_encoders.py --methods ridge gene-dml --feature-mode lattice
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
from _common import HER2ST, device_info, markdown_table, read_image_sections, save

import genedml_sd as gd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(HER2ST))
    p.add_argument("--encoders", nargs="+", default=["stain-texture", "stain-texture-nuclei"])
    p.add_argument("--methods", nargs="+", default=["ridge", "mlp", "bleep"])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-mode", default="spot", choices=["spot", "lattice"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    start = time.perf_counter()
    gd.settings.progress = False
    tmp = tempfile.TemporaryDirectory(prefix="gd-encoders-") if args.cache_dir is None else None
    cache_dir = args.cache_dir or tmp.name  # type: ignore[union-attr]

    sections, slides = read_image_sections(args.root)

    results: dict[tuple[str, str], pd.DataFrame] = {}
    rows = []
    for encoder in args.encoders:
        enc = gd.encoders.load_encoder(encoder)
        for method in args.methods:
            t0 = time.perf_counter()
            df = gd.tl.cross_validate(
                slides,
                method=method,
                encoder=enc,
                genes=args.genes,
                max_epochs=args.epochs,
                seed=args.seed,
                feature_mode=args.feature_mode,
                cache_dir=cache_dir,
                keep_predictions=True,
            )
            results[encoder, method] = df
            mean, sd = df[df["fold"] == "mean"].iloc[0], df[df["fold"] == "sd"].iloc[0]
            rows.append(
                {
                    "encoder": encoder,
                    "method": method,
                    "pcc_a": float(mean["pcc_a"]),
                    "pcc_a_sd": float(sd["pcc_a"]),
                    "pcc_h_leak_free": float(mean["pcc_h_leak_free"]),
                    "reliability_rho": float(mean["reliability_rho"]),
                    "feature_seconds": float(sum(df.attrs["feature_seconds"].values())),
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(f"{encoder} / {method}: PCC(A) {rows[-1]['pcc_a']:.3f} ± {rows[-1]['pcc_a_sd']:.3f}", flush=True)

    first, *others = args.encoders
    paired = pd.concat(
        [
            gd.tl.compare_methods(
                results[other, m], results[first, m], labels=(f"{other} / {m}", f"{first} / {m}"), seed=args.seed
            )
            for other in others
            for m in args.methods
        ],
        ignore_index=True,
    )
    dev = device_info()
    print(f"\nHER2ST leave-one-patient-out, {len(slides)} sections, {args.genes} genes, {args.feature_mode} features")
    print(
        markdown_table(
            [
                {
                    "encoder": r["encoder"],
                    "method": r["method"],
                    "PCC(A)": f"{r['pcc_a']:.3f} ± {r['pcc_a_sd']:.3f}",
                    "PCC(H) leak-free": f"{r['pcc_h_leak_free']:.3f}",
                    "features s": f"{r['feature_seconds']:.0f}",
                }
                for r in rows
            ],
            ["encoder", "method", "PCC(A)", "PCC(H) leak-free", "features s"],
        )
    )
    cols = ["method_a", "method_b", "delta_pcc_a", "ci_low", "ci_high", "wilcoxon_p", "folds_a_better"]
    print(markdown_table(paired[cols].to_dict(orient="records"), cols))
    payload = {
        "sections": sections,
        "encoders": args.encoders,
        "methods": args.methods,
        "epochs": args.epochs,
        "genes": args.genes,
        "seed": args.seed,
        "feature_mode": args.feature_mode,
        "device": dev,
        "summary": rows,
        "paired": paired.to_dict(orient="records"),
        "total_seconds": time.perf_counter() - start,
    }
    print(f"wrote {save('offline_encoders' + (f'_{args.tag}' if args.tag else ''), payload)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
