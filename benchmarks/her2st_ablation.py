"""What makes Gene-DML help across patients: ablations and baselines, leave-one-patient-out, with paired statistics.

Every variant is cross-validated on the HER2ST sections with images (leave one patient out) on the
same cached features, genes, folds and validation sections; only the training recipe changes. For
every variant the script reports PCC(A) per fold, the epochs trained and the best epoch (early
stopping on the validation section, never on the test patient), the reliability rho and, for seed
ensembles, the uncertainty rho; beside them the ceiling reference (each test spot predicted by the
mean measured expression of its adjacent spots, information no image model has); then a paired
comparison of the reference variant against every other one (difference of PCC(A), 95 % bootstrap
interval over test spots, Wilcoxon signed-rank test over the per-gene differences). Nothing is tuned:
each variant is one fixed recipe, run once.

    python benchmarks/her2st_ablation.py                     # the run in the docs (2-core CPU: ~50 min)
    python benchmarks/her2st_ablation.py --variants gene-dml ridge --epochs 5 --tag quick
    python benchmarks/her2st_ablation.py --gene-flavor mean  # the 250 most expressed genes instead

It writes ``benchmarks/results/her2st_ablation[_<tag>].json`` and runs unchanged on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pandas as pd
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, read_image_sections, save

import genedml_sd as gd

# label -> (method, config preset, extra fit arguments, ensemble members)
VARIANTS: dict[str, tuple[str, str, dict, int]] = {
    "gene-dml": ("gene-dml", "full", {}, 1),  # today's defaults (predictor="auto" since 2026-12-03)
    "gene-dml/head": ("gene-dml", "full", {"predictor": "head"}, 1),  # the paper's predictor, the default before
    "gene-dml/slide-standardised": ("gene-dml", "full", {"slide_standardise": True}, 1),
    "gene-dml/ensemble-3": ("gene-dml", "full", {}, 3),
    "gene-dml/no-instance": ("gene-dml", "no-instance", {}, 1),
    "gene-dml/no-group": ("gene-dml", "no-group", {}, 1),
    "gene-dml/mse-only": ("gene-dml", "mse-only", {}, 1),
    "gene-dml/lr-per-step": ("gene-dml", "full", {"lr_interval": "step"}, 1),
    "gene-dml/k-6": ("gene-dml", "full", {"k": 6}, 1),
    "gene-dml/lam-0.2": ("gene-dml", "full", {"lam": 0.2}, 1),
    "gene-dml/tau-ig-0.5": ("gene-dml", "full", {"tau_ig": 0.5}, 1),
    "gene-dml/k-48": ("gene-dml", "full", {"k": 48}, 1),
    "gene-dml/tau-0.3-fixed": ("gene-dml", "full", {"tau_init": 0.3, "learn_tau": False}, 1),
    "gene-dml/retrieval": ("gene-dml", "full", {"predictor": "retrieval"}, 1),
    "gene-dml/blend": ("gene-dml", "full", {"predictor": "blend"}, 1),
    "gene-dml/auto": ("gene-dml", "full", {"predictor": "auto"}, 1),
    "gene-dml/auto/ensemble-3": ("gene-dml", "full", {"predictor": "auto"}, 3),
    "gene-dml/auto/no-group": ("gene-dml", "no-group", {"predictor": "auto"}, 1),
    "gene-dml/auto/no-multiscale": ("gene-dml", "no-multiscale", {"predictor": "auto"}, 1),
    "gene-dml/retrieval/no-group": ("gene-dml", "no-group", {"predictor": "retrieval"}, 1),
    "gene-dml/retrieval/contrastive-only": ("gene-dml", "contrastive-only", {"predictor": "retrieval"}, 1),
    "gene-dml/val-patient": ("gene-dml", "full", {"val_sections": "patient"}, 1),
    "gene-dml/val-patient/no-group": ("gene-dml", "no-group", {"val_sections": "patient"}, 1),
    "gene-dml/val-patient/mse-only": ("gene-dml", "mse-only", {"val_sections": "patient"}, 1),
    "gene-dml/mixed-slides": ("gene-dml", "full", {"mix_slides": True}, 1),
    "gene-dml/mixed-slides+slide-standardised": (
        "gene-dml",
        "full",
        {"mix_slides": True, "slide_standardise": True},
        1,
    ),
    "ridge": ("ridge", "default", {}, 1),
    "ridge/slide-standardised": ("ridge", "default", {"slide_standardise": True}, 1),
    "mlp": ("mlp", "default", {}, 1),
    "mlp/ensemble-3": ("mlp", "default", {}, 3),
    "bleep": ("bleep", "default", {}, 1),
    "bleep/mixed-slides": ("bleep", "default", {"mix_slides": True}, 1),
    "nh2st": ("nh2st", "default", {}, 1),
    "nh2st/mixed-slides": ("nh2st", "default", {"mix_slides": True}, 1),
}
DEFAULT = [  # the reference first, then the baselines, then the Gene-DML variants
    "gene-dml",
    "ridge",
    "ridge/slide-standardised",
    "mlp",
    "mlp/ensemble-3",
    "bleep",
    "nh2st",
    "gene-dml/slide-standardised",
    "gene-dml/no-instance",
    "gene-dml/no-group",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(HER2ST), help="HER2ST folder (sections.csv index)")
    p.add_argument("--encoder", default="stain-texture")
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    p.add_argument("--reference", default="gene-dml", help="variant every other one is compared with")
    p.add_argument(
        "--pair",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also compare variant A with variant B (repeatable), e.g. --pair bleep/mixed-slides bleep",
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--gene-flavor", default="variance", choices=["variance", "mean"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--tag", default="")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: a temporary folder)")
    args = p.parse_args()
    if args.reference not in args.variants:
        p.error(f"--reference {args.reference!r} must be one of the variants run")
    for a, b in args.pair:
        if a not in args.variants or b not in args.variants:
            p.error(f"--pair {a} {b}: both must be among the variants run")
    start = time.perf_counter()
    gd.settings.progress = False
    tmp = tempfile.TemporaryDirectory(prefix="gd-ablation-") if args.cache_dir is None else None
    cache_dir = args.cache_dir or tmp.name  # type: ignore[union-attr]

    sections, slides = read_image_sections(args.root)
    print(f"{len(slides)} sections {sections}", flush=True)
    enc = gd.encoders.load_encoder(args.encoder)

    results: dict[str, pd.DataFrame] = {}
    rows: list[dict] = []
    name = "her2st_ablation" + (f"_{args.tag}" if args.tag else "")
    settings = {
        "encoder": args.encoder,
        "sections": sections,
        "genes": args.genes,
        "gene_flavor": args.gene_flavor,
        "epochs": args.epochs,
        "patience": args.patience,
        "seed": args.seed,
        "reference": args.reference,
        "device": device_info(),
    }
    for label in args.variants:
        method, config, extra, n_models = VARIANTS[label]
        t0 = time.perf_counter()
        df = gd.tl.cross_validate(
            slides,
            groups="patient",
            method=method,
            config=config,
            encoder=enc,
            genes=args.genes,
            gene_flavor=args.gene_flavor,
            max_epochs=args.epochs,
            patience=args.patience,
            seed=args.seed,
            n_models=n_models,
            feature_mode="spot",
            cache_dir=cache_dir,
            keep_predictions=True,
            **extra,
        )
        wall = time.perf_counter() - t0
        results[label] = df
        folds = df[~df["fold"].isin(["mean", "sd"])]
        mean, sd = df[df["fold"] == "mean"].iloc[0], df[df["fold"] == "sd"].iloc[0]
        row = {
            "variant": label,
            "pcc_a": float(mean["pcc_a"]),
            "pcc_a_sd": float(sd["pcc_a"]),
            "pcc_a_folds": [float(x) for x in folds["pcc_a"]],
            "pcc_h_leak_free": float(mean["pcc_h_leak_free"]),
            "val_pcc_a": float(mean["val_pcc_a"]),  # folds with a validation section (training data only)
            "mse": float(mean["mse"]),
            "reliability_rho": float(mean["reliability_rho"]),
            "uncertainty_rho": float(mean["uncertainty_rho"]) if "uncertainty_rho" in df else float("nan"),
            "neighbour_pcc_a": float(mean["neighbour_pcc_a"]),
            "epochs": [int(e) for e in folds["epochs"]],
            "best_epoch": [None if pd.isna(e) else int(e) for e in folds["best_epoch"]],
            "selected": [str(x) for x in folds["selected"]],
            "train_s": float(folds["train_seconds"].sum()),
            "wall_s": wall,
        }
        rows.append(row)
        save(name, {**settings, "summary": rows, "paired": [], "partial": True})  # progress, in case of a stop
        print(
            f"{label}: PCC(A) {row['pcc_a']:.3f} ± {row['pcc_a_sd']:.3f}, epochs {row['epochs']}, best "
            f"{row['best_epoch']}, wall {wall:.0f}s" + (f", chose {row['selected']}" if any(row["selected"]) else ""),
            flush=True,
        )

    ref = results[args.reference]
    pairs = [
        gd.tl.compare_methods(ref, results[label], labels=(args.reference, label), n_boot=args.n_boot, seed=args.seed)
        for label in args.variants
        if label != args.reference
    ] + [
        gd.tl.compare_methods(results[a], results[b], labels=(a, b), n_boot=args.n_boot, seed=args.seed)
        for a, b in args.pair
    ]
    paired = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame()

    dev = device_info()
    print(
        f"\nHER2ST leave-one-patient-out, {len(slides)} sections, encoder {args.encoder}, {args.genes} genes "
        f"({args.gene_flavor}), at most {args.epochs} epochs (patience {args.patience}), seed {args.seed}, device "
        f"{'cuda ' + dev.get('gpu', '') if dev['cuda'] else 'cpu x' + str(dev['cpu_count'])}"
    )
    print(
        markdown_table(
            [
                {
                    "variant": r["variant"],
                    "PCC(A)": f"{r['pcc_a']:.3f} ± {r['pcc_a_sd']:.3f}",
                    "per fold": " / ".join(f"{x:.3f}" for x in r["pcc_a_folds"]),
                    "val PCC(A)": "" if np.isnan(r["val_pcc_a"]) else f"{r['val_pcc_a']:.3f}",
                    "epochs (best)": ", ".join(f"{e} ({b})" for e, b in zip(r["epochs"], r["best_epoch"], strict=True)),
                    "reliability rho": f"{r['reliability_rho']:.2f}",
                    "uncertainty rho": "" if np.isnan(r["uncertainty_rho"]) else f"{r['uncertainty_rho']:.2f}",
                    "train s": f"{r['train_s']:.0f}",
                }
                for r in rows
            ],
            [
                "variant",
                "PCC(A)",
                "per fold",
                "val PCC(A)",
                "epochs (best)",
                "reliability rho",
                "uncertainty rho",
                "train s",
            ],
        )
    )
    print(f"ceiling reference (mean of adjacent spots' measured expression): PCC(A) {rows[0]['neighbour_pcc_a']:.3f}")
    if len(paired):
        print(
            f"\nPaired: {args.reference} (or A of --pair) minus each variant (95 % CI over test spots, Wilcoxon over genes)"
        )
        cols = [
            "method_a",
            "method_b",
            "delta_pcc_a",
            "ci_low",
            "ci_high",
            "wilcoxon_p",
            "frac_genes_a_better",
            "folds_a_better",
        ]
        print(markdown_table(paired[cols].to_dict(orient="records"), cols))
    total = time.perf_counter() - start
    print(f"peak host RSS {peak_rss_mb():.0f} MB; whole run {total / 60:.1f} min")
    payload = {
        **settings,
        "summary": rows,
        "paired": paired.to_dict(orient="records"),
        "folds": {k: v[~v["fold"].isin(["mean", "sd"])].to_dict(orient="records") for k, v in results.items()},
        "total_seconds": total,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(f"wrote {save(name, payload)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
