"""HEST-Benchmark linear probe, then Gene-DML and the baselines, on the same HEST task and splits.

By default the task is written from the HER2ST sections with images (A1, B4, C2, C3, C4 of the data
root: real pixels and counts) into a temporary folder in HEST-Benchmark's layout, one split per patient
(3 splits); ``--bench-dir`` runs on existing HEST tasks instead (e.g. HEST-Benchmark's own ``bench_data``).

1. The probe (:func:`genedml_sd.tl.hest_benchmark`'s protocol): frozen-encoder features of the 224 px
   patches, StandardScaler -> PCA-256 -> ridge with HEST's alpha, mean per-gene Pearson r per split.
2. The methods of the model layer trained on the same features and ``log1p`` targets, split by split:
   ridge (the package's, closed form with intercept), MLP, BLEEP and Gene-DML. A HEST patch file gives
   one spot-centred tile and its coordinates, so the neighbour (5x5 grid) scale is not available:
   Gene-DML runs with its local and global (slide context, from the coordinates) scales,
   ``use_neighbour=False``, and as ``gene-dml/local`` with the local scale only. Gradient-trained methods
   run a fixed number of epochs (``--epochs``) without validation: nothing is tuned, least of all on
   the test split. Scores are the probe's: Pearson r per gene over all test spots, mean over genes,
   then mean and population sd (ddof 0) over splits.

    python benchmarks/hest_bench.py                      # HER2ST task, stain-texture, CPU defaults
    python benchmarks/hest_bench.py --bench-dir eval/bench_data --tasks IDC --encoder uni
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import HER2ST, device_info, markdown_table, peak_rss_mb, save

import genedml_sd as gd
from genedml_sd.tl import hest_probe_task, load_hest_task
from genedml_sd.tl._hest import task_dirs

# label -> (registered method, config overrides)
METHODS = {
    "ridge": ("ridge", {}),
    "mlp": ("mlp", {}),
    "bleep": ("bleep", {}),
    "gene-dml": ("gene-dml", {"use_neighbour": False}),
    "gene-dml/local": ("gene-dml", {"use_neighbour": False, "use_global": False}),
}


def write_her2st_task(bench_dir: Path, root: Path, max_spots: int | None) -> list[str]:
    from genedml_sd.datasets._layouts.hest_bench import write_hest_task

    index = pd.read_csv(root / "sections.csv")
    sections = [str(s) for s in index.loc[index["has_image"].astype(bool), "section"]]
    # a generator: one full-resolution section in memory at a time
    write_hest_task(bench_dir, (gd.io.her2st(root, s) for s in sections), task="HER2ST", max_spots=max_spots)
    return sections


def slide_tensors(task) -> dict:
    from genedml_sd.model import SlideTensors

    out = {}
    for sid, s in task.samples.items():
        if s.centres_um is None:
            raise ValueError(f"Sample {sid}: the patch file records no pixel_size; µm coordinates are unknown.")
        out[sid] = SlideTensors.from_numpy(s.features, s.centres_um, expr=s.expression, name=sid)
    return out


def run_method(label: str, task, slides: dict, args) -> dict:
    from genedml_sd.model import TrainArgs, get_method, quiet_lightning, train_method

    method, overrides = METHODS[label]
    spec = get_method(method)
    d, g = next(iter(slides.values())).local.shape[1], len(task.genes)
    rows = []
    for i, (train_ids, test_ids) in enumerate(task.splits):
        config = spec.config(enc_dim=d, n_genes=g, **overrides)
        targs = TrainArgs(max_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, accelerator="cpu")
        t0 = time.perf_counter()
        with quiet_lightning():
            result = train_method(spec, [slides[s] for s in train_ids], None, config, targs)
        train_s = time.perf_counter() - t0
        module = result.module.cpu().eval()
        pred = np.concatenate(
            [module.predict_slide(slides[s].local, slides[s].coords).detach().numpy() for s in test_ids]
        )
        obs = np.concatenate([task.samples[s].expression for s in test_ids])
        r = gd.tl.per_gene_pearson(pred, obs, task.genes)["pcc"].to_numpy()
        rows.append({"split": i, "pearson_mean": float(np.mean(r)), "train_s": train_s, "epochs": len(result.history)})
        print(f"  {label} split {i}: PCC {rows[-1]['pearson_mean']:.3f} ({train_s:.0f}s)", flush=True)
    means = [r["pearson_mean"] for r in rows]
    return {"splits": rows, "mean": float(np.mean(means)), "sd": float(np.std(means))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-dir", default=None, help="HEST bench_data folder (default: write the HER2ST task)")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--root", default=str(HER2ST), help="HER2ST folder for the default task")
    p.add_argument("--max-spots", type=int, default=None, help="spots per section in the HER2ST task")
    p.add_argument("--encoder", default="stain-texture")
    p.add_argument("--pretrained", type=int, default=1, help="0 = random-init encoder weights")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1, help="probe seed (HEST's default 1) and training seed")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    start = time.perf_counter()
    gd.settings.progress = False

    tmp = None
    sections = None
    if args.bench_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gd-hest-")
        bench = Path(tmp.name)
        t0 = time.perf_counter()
        sections = write_her2st_task(bench, Path(args.root), args.max_spots)
        print(f"wrote HER2ST task ({sections}) in {time.perf_counter() - t0:.0f}s", flush=True)
    else:
        bench = Path(args.bench_dir)
    enc = gd.encoders.load_encoder(args.encoder, pretrained=bool(args.pretrained))

    results, table = {}, []
    for task_dir in task_dirs(bench, args.tasks):
        t0 = time.perf_counter()
        task = load_hest_task(task_dir, enc)
        feature_s = time.perf_counter() - t0
        n_spots = sum(len(s.barcodes) for s in task.samples.values())
        print(f"{task.name}: {len(task.samples)} samples, {n_spots} spots encoded in {feature_s:.0f}s", flush=True)
        t0 = time.perf_counter()
        rows, per_gene = hest_probe_task(task, seed=args.seed)
        probe_s = time.perf_counter() - t0
        splits = [r for r in rows if r["split"] not in ("mean", "sd")]
        summary = {r["split"]: r["pearson_mean"] for r in rows if r["split"] in ("mean", "sd")}
        entry = {
            "samples": {sid: len(s.barcodes) for sid, s in task.samples.items()},
            "splits": task.splits,
            "genes": task.genes,
            "feature_seconds": feature_s,
            "probe": {"splits": splits, **summary, "seconds": probe_s, "per_gene": per_gene},
            "methods": {},
        }
        table.append(_row(task.name, "HEST probe (PCA-256 + ridge)", summary["mean"], summary["sd"], splits, probe_s))
        slides = slide_tensors(task) if args.methods else {}
        for label in args.methods:
            res = run_method(label, task, slides, args)
            entry["methods"][label] = res
            train_s = sum(r["train_s"] for r in res["splits"])
            table.append(_row(task.name, label, res["mean"], res["sd"], res["splits"], train_s))
        results[task.name] = entry

    dev = device_info()
    cols = ["task", "method", "PCC mean ± sd", "per split", "seconds"]
    print(
        f"\nHEST-Benchmark protocol, encoder {args.encoder} ({'pretrained' if args.pretrained else 'random init'}), "
        f"{args.epochs} epochs, seed {args.seed}, device "
        f"{'cuda ' + dev.get('gpu', '') if dev['cuda'] else 'cpu x' + str(dev['cpu_count'])}"
    )
    print(markdown_table(table, cols))
    total_s = time.perf_counter() - start
    print(f"peak host RSS {peak_rss_mb():.0f} MB; whole run {total_s / 60:.1f} min")
    payload = {
        "bench_dir": None if tmp is not None else str(bench),
        "her2st_sections": sections,
        "max_spots": args.max_spots,
        "encoder": args.encoder,
        "pretrained": bool(args.pretrained),
        "encoder_fingerprint": enc.fingerprint,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": dev,
        "table": table,
        "results": results,
        "total_seconds": total_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    name = (
        "hest_bench"
        + (f"_{args.encoder}" if args.encoder != "stain-texture" else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    print(f"wrote {save(name, payload)}")
    if tmp is not None:
        tmp.cleanup()


def _row(task: str, method: str, mean: float, sd: float, splits: list[dict], seconds: float) -> dict:
    return {
        "task": task,
        "method": method,
        "PCC mean ± sd": f"{mean:.3f} ± {sd:.3f}",
        "per split": ", ".join(f"{r['pearson_mean']:.3f}" for r in splits),
        "seconds": f"{seconds:.0f}",
    }


if __name__ == "__main__":
    main()
