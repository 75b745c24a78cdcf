"""Fit the full Gene-DML model on the HER2ST image sections; time, peak memory and held-out PCC.

Trains on every section with an image except those of the test patient (a validation section is
held out from the training sections for early stopping), predicts the test patient's sections and
reports PCC(A), feature-extraction and training time, and peak host memory. The same script runs
unchanged on a GPU (Lightning ``accelerator="auto"``, bf16 autocast).

    python benchmarks/fit_her2st.py [--encoder stain-texture] [--test-patient B] [--epochs 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, save

import genedml_sd as gd
from genedml_sd.tl._data import resolve_slide_keys, slide_expression


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="stain-texture")
    p.add_argument("--pretrained", type=int, default=1, help="0 = random-init encoder (speed only)")
    p.add_argument("--test-patient", default="B")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--config", default="full")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    gd.settings.progress = False
    import pandas as pd

    index = pd.read_csv(HER2ST / "sections.csv")
    sections = [str(s) for s in index.loc[index["has_image"].astype(bool), "section"]]
    t0 = time.perf_counter()
    slides = {s: gd.io.her2st(HER2ST, s) for s in sections}
    t_read = time.perf_counter() - t0
    patient = dict(zip(index["section"].astype(str), index["patient"].astype(str), strict=True))
    test = {s: sd for s, sd in slides.items() if patient[s] == args.test_patient}
    train = {s: sd for s, sd in slides.items() if patient[s] != args.test_patient}
    print(f"train {list(train)}  test {list(test)}  (read in {t_read:.0f}s)", flush=True)

    from genedml_sd.encoders import extract_features, load_encoder

    enc = load_encoder(args.encoder, pretrained=bool(args.pretrained))
    t0 = time.perf_counter()
    for sd in slides.values():
        extract_features(sd, enc, neighbours=True)
    t_features = time.perf_counter() - t0
    print(f"features of {len(slides)} sections in {t_features:.0f}s", flush=True)

    model = gd.tl.fit(
        list(train.values()), encoder=enc, genes=args.genes, config=args.config, max_epochs=args.epochs, seed=args.seed
    )
    rows = []
    for s, sd in test.items():
        gd.tl.predict(sd, model, key_added="gd_predictions", overwrite=True, encoder=enc)
        keys = resolve_slide_keys(sd, None, None, "table", need_table=True)
        obs = slide_expression(sd, keys, model.genes)
        scores = gd.tl.per_gene_pearson(sd.tables["gd_predictions"].X, obs, model.genes)
        valid = scores[~scores["constant"]]
        rows.append(
            {
                "section": s,
                "spots": int(obs.shape[0]),
                "pcc_a": float(valid["pcc"].mean()),
                "mse": float(valid["mse"].mean()),
                "mae": float(valid["mae"].mean()),
            }
        )
    result = {
        "encoder": args.encoder,
        "pretrained": bool(args.pretrained),
        "config": args.config,
        "train_sections": model.training["sections"],
        "validation_sections": model.training["validation_sections"],
        "epochs": model.training["epochs"],
        "train_seconds": model.training["seconds"],
        "feature_seconds": t_features,
        "read_seconds": t_read,
        "peak_rss_mb": peak_rss_mb(),
        "device": device_info(),
        "test": rows,
        "pcc_a_mean": float(np.mean([r["pcc_a"] for r in rows])),
        "seed": args.seed,
    }
    print(markdown_table(rows, ["section", "spots", "pcc_a", "mse", "mae"]))
    print(
        f"train {result['train_seconds']:.0f}s for {result['epochs']} epochs "
        f"(val {result['validation_sections']}); features {t_features:.0f}s; peak RSS {result['peak_rss_mb']:.0f} MB; "
        f"device {'cuda' if result['device']['cuda'] else 'cpu'}"
    )
    print(f"wrote {save(f'fit_her2st_{args.encoder}_{args.config}', result)}")


if __name__ == "__main__":
    main()
