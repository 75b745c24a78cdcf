"""``gd.tl.hest_benchmark``: the HEST-Benchmark linear probe of a frozen encoder, on tasks in HEST's layout.

Protocol and layout as in HEST-Library (github.com/mahmoodlab/HEST, ``src/hest/bench/``, read at commit
afd42c3; nothing copied): ``benchmark.py`` (``BenchmarkConfig`` defaults, ``predict_folds``,
``predict_single_split``, ``merge_fold_results``), ``trainer.py`` (``train_test_reg``) and ``st_dataset.py``
(``load_adata``, ``normalize_adata``). Task folders are ``<bench_dir>/<task>/`` with ``splits/train_<i>.csv``
and ``test_<i>.csv`` (columns ``sample_id, patches_path, expr_path``, paths relative to the task folder),
``patches/<id>.h5`` (``img`` (N, 224, 224, 3) uint8, ``coords`` (N, 2) top-left px, ``barcode`` (N, 1)),
``adata/<id>.h5ad`` (raw counts, ``obs`` indexed by barcode) and ``var_50genes.json`` (``{"genes": [...]}``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd._settings import settings

from ._metrics import per_gene_pearson

if TYPE_CHECKING:
    from genedml_sd.encoders import FrozenEncoder

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")


@dataclass
class HESTSample:
    """One sample of a HEST task: encoded patches and their expression, rows in patch-file order.

    Attributes
    ----------
    sample_id, barcodes
        The split files' ``sample_id``; the patch file's ``barcode`` (N,).
    features
        Frozen-encoder features (N, D) float32 of the 224 px patches.
    coords_px
        The patch file's ``coords``: top-left corners (x, y) in source px (N, 2).
    centres_um
        Patch centres (x, y) in µm (N, 2), from ``coords`` and the patch attributes ``pixel_size`` and
        ``patch_size_src``; ``None`` if the file does not record the pixel size.
    expression
        ``log1p`` of the raw counts of the task's genes (N, G) float64 (HEST's ``normalize=True``).
    """

    sample_id: str
    barcodes: list[str]
    features: np.ndarray
    coords_px: np.ndarray
    centres_um: np.ndarray | None
    expression: np.ndarray


@dataclass
class HESTTask:
    """A HEST task read and encoded once: its genes, samples and splits (sample ids)."""

    name: str
    genes: list[str]
    samples: dict[str, HESTSample]
    splits: list[tuple[list[str], list[str]]] = field(default_factory=list)

    def stack(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features (n, D) and expression (n, G) of samples ``ids``, concatenated in that order."""
        x = np.concatenate([self.samples[s].features for s in ids])
        return x, np.concatenate([self.samples[s].expression for s in ids])


def task_dirs(bench_dir: str | Path, tasks: Sequence[str] | None = None) -> list[Path]:
    """Task folders of ``bench_dir`` (every sub-folder with ``splits/``; ``bench_dir`` itself if it has one)."""
    root = Path(bench_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"HEST benchmark folder {str(root)!r} does not exist.")
    if tasks is not None:
        out = [root / t for t in tasks]
        for t in out:
            if not (t / "splits").is_dir():
                raise FileNotFoundError(f"HEST task {t.name!r}: no splits folder {str(t / 'splits')!r}.")
        return out
    if (root / "splits").is_dir():
        return [root]
    out = sorted(p for p in root.iterdir() if (p / "splits").is_dir())
    if not out:
        raise FileNotFoundError(f"No HEST task in {str(root)!r}: no sub-folder has a splits/ folder.")
    return out


def read_splits(task_dir: Path) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The ``(train_i, test_i)`` tables of a task, i = 0, 1, ... (``predict_folds``: all pairs in ``splits/``)."""
    split_dir = task_dir / "splits"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"HEST task {task_dir.name!r}: no splits folder {str(split_dir)!r}.")
    idx = {
        kind: sorted(int(p.stem.split("_")[-1]) for p in split_dir.glob(f"{kind}_*.csv")) for kind in ("train", "test")
    }
    if not idx["train"] or idx["train"] != idx["test"] or idx["train"] != list(range(len(idx["train"]))):
        raise FileNotFoundError(
            f"{str(split_dir)!r} must hold train_<i>.csv and test_<i>.csv for i = 0..n-1; found train "
            f"{idx['train']} and test {idx['test']}."
        )
    out = []
    for i in idx["train"]:
        pair = []
        for kind in ("train", "test"):
            path = split_dir / f"{kind}_{i}.csv"
            frame = pd.read_csv(path, dtype=str)
            missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
            if missing:
                raise ValueError(
                    f"{str(path)!r} lacks column(s) {missing}; HEST split files have {list(SPLIT_COLUMNS)}."
                )
            if frame.empty:
                raise ValueError(f"{str(path)!r} lists no sample.")
            pair.append(frame)
        shared = sorted(set(pair[0]["sample_id"]) & set(pair[1]["sample_id"]))
        if shared:
            raise ValueError(f"Split {i} of task {task_dir.name!r} has samples {shared} in both train and test.")
        out.append((pair[0], pair[1]))
    return out


def read_genes(task_dir: Path, gene_list: str = "var_50genes.json") -> list[str]:
    """The task's genes: the ``"genes"`` list of ``<task>/<gene_list>``."""
    path = task_dir / gene_list
    if not path.is_file():
        raise FileNotFoundError(f"HEST task {task_dir.name!r}: gene list {str(path)!r} not found.")
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or "genes" not in content:
        raise KeyError(f"{str(path)!r} has no 'genes' key (HEST gene lists are {{\"genes\": [...]}}).")
    genes = [str(g) for g in content["genes"]]
    if not genes:
        raise ValueError(f"{str(path)!r} lists no gene.")
    return genes


def _h5_strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _patch_meta(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Barcodes, top-left px (N, 2) and centres in µm (or ``None``) of one patch file, checking its keys."""
    import h5py

    with h5py.File(path, "r") as f:
        for key in ("img", "coords", "barcode"):
            if key not in f:
                raise KeyError(f"HEST patch file {str(path)!r} has no {key!r} dataset (keys: {sorted(f.keys())}).")
        img = f["img"]
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"{str(path)!r}: 'img' must be (N, H, W, 3) RGB tiles, got {img.shape}.")
        barcodes = _h5_strings(f["barcode"][:])
        coords = np.asarray(f["coords"][:], dtype=np.float64).reshape(-1, 2)
        if not (len(barcodes) == len(coords) == img.shape[0]):
            raise ValueError(
                f"{str(path)!r}: 'img', 'coords', 'barcode' lengths differ: {img.shape[0]}, {len(coords)}, {len(barcodes)}."
            )
        attrs = {**dict(f["coords"].attrs), **dict(img.attrs)}
        side = img.shape[1]
    centres = None
    if "pixel_size" in attrs:  # hestcore writes it on 'img' or 'coords' (source µm/px)
        size = float(attrs.get("patch_size_src", attrs.get("patch_size_target", side)))
        centres = (coords + size / 2) * float(attrs["pixel_size"])
    return barcodes, coords, centres


def _encode_patches(
    path: Path, encoder: FrozenEncoder, device: Any, batch_size: int, precision: str, bar: Any
) -> np.ndarray:
    """Features (N, D) float32 of the tiles ``img`` of one patch file, ``batch_size`` tiles per call."""
    import h5py
    import torch

    from genedml_sd.encoders._frozen import autocast_context

    with h5py.File(path, "r") as f:
        img = f["img"]
        feats = np.empty((img.shape[0], encoder.embed_dim), np.float32)
        with torch.inference_mode(), autocast_context(device, precision):
            for start in range(0, img.shape[0], batch_size):
                tiles = torch.from_numpy(np.ascontiguousarray(img[start : start + batch_size])).permute(0, 3, 1, 2)
                feats[start : start + len(tiles)] = encoder(tiles.to(device)).float().cpu().numpy()
                bar.update(len(tiles))
    return feats


def _expression(path: Path, genes: Sequence[str], barcodes: Sequence[str], normalize: bool) -> np.ndarray:
    """``load_adata(expr_path, genes, barcodes, normalize)``: ``log1p`` of ``adata[barcodes][:, genes]``, float64."""
    import anndata as ad
    import scipy.sparse as sp

    if not path.is_file():
        raise FileNotFoundError(f"HEST expression file {str(path)!r} not found.")
    adata = ad.read_h5ad(path)
    missing_genes = [g for g in genes if g not in adata.var_names]
    if missing_genes:
        raise KeyError(
            f"{str(path)!r} lacks {len(missing_genes)} gene(s) of the task's gene list: {missing_genes[:10]}."
        )
    rows = adata.obs_names.get_indexer(list(barcodes))
    if (rows < 0).any():
        bad = [b for b, r in zip(barcodes, rows, strict=True) if r < 0]
        raise KeyError(f"{str(path)!r} has no row for {len(bad)} barcode(s) of the patch file, e.g. {bad[:5]}.")
    x = adata.X[rows][:, adata.var_names.get_indexer(list(genes))]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    return np.log1p(x) if normalize else x


def load_hest_task(
    task_dir: str | Path,
    encoder: str | FrozenEncoder = "stain-texture",
    *,
    pretrained: bool = True,
    gene_list: str = "var_50genes.json",
    normalize: bool = True,
    batch_size: int = 128,
    device: str | None = None,
    precision: str = "auto",
) -> HESTTask:
    """Read a HEST task and encode each of its samples' patches once.

    Parameters
    ----------
    task_dir
        The task folder (``<bench_dir>/<task>``).
    encoder
        Frozen encoder name or a loaded :class:`~genedml_sd.encoders.FrozenEncoder`; it gets the uint8 tiles
        (B, 3, 224, 224) and resizes them to its own input size if needed.
    pretrained
        With an encoder name: ``False`` for random-init weights (tests only).
    gene_list
        Gene list file in the task folder (``"genes"`` key).
    normalize
        ``log1p`` of the counts (HEST's default ``normalize=True``: ``log1p`` only, no total-count scaling).
    batch_size
        Tiles per encoder call.
    device, precision
        Torch device (``None``: CUDA when available); encoder autocast ``"auto"`` (bf16 on CUDA, none on
        the CPU), ``"32"``, ``"16"`` or ``"bf16"``.

    Returns
    -------
    :class:`HESTTask` with every sample of any split (features (N, D), expression (N, G)).
    """
    import torch
    from tqdm.auto import tqdm

    from ._fit import resolve_encoder

    task_dir = Path(task_dir)
    splits = read_splits(task_dir)
    genes = read_genes(task_dir, gene_list)
    enc, _ = resolve_encoder(encoder, pretrained=pretrained)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = enc.to(dev)
    rows: dict[str, pd.Series] = {}
    for train, test in splits:
        for frame in (train, test):
            for _, row in frame.iterrows():
                rows.setdefault(str(row["sample_id"]), row)
    # read and check every sample's files before encoding anything
    meta, expr = {}, {}
    for sid, row in rows.items():
        path = task_dir / str(row["patches_path"])
        if not path.is_file():
            raise FileNotFoundError(f"HEST patch file {str(path)!r} (sample {sid!r}) not found.")
        meta[sid] = (path, *_patch_meta(path))
        expr[sid] = _expression(task_dir / str(row["expr_path"]), genes, meta[sid][1], normalize)
    samples: dict[str, HESTSample] = {}
    total = sum(len(m[1]) for m in meta.values())
    with tqdm(total=total, desc=f"encoding {task_dir.name} patches ({enc.name})", disable=not settings.progress) as bar:
        for sid, (path, barcodes, coords, centres) in meta.items():
            feats = _encode_patches(path, enc, dev, batch_size, precision, bar)
            samples[sid] = HESTSample(sid, barcodes, feats, coords, centres, expr[sid])
    ids = [([str(s) for s in tr["sample_id"]], [str(s) for s in te["sample_id"]]) for tr, te in splits]
    return HESTTask(task_dir.name, genes, samples, ids)


def hest_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    latent_dim: int = 256,
    seed: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """HEST-Benchmark's ridge probe on one split: per-gene Pearson r on the test spots.

    ``StandardScaler`` then ``PCA(latent_dim, random_state=seed)`` fitted on the training features
    (``predict_single_split``, ``dimreduce="PCA"``), the scores cast to float32 (as HEST's
    ``torch.Tensor``), then ``Ridge(alpha=100 / (n_components * n_genes), solver="lsqr",
    fit_intercept=False, max_iter=1000, random_state=seed)`` (``train_test_reg``: alpha from the feature
    count *after* PCA) and the Pearson r of every gene over all test spots.

    Parameters
    ----------
    x_train, x_test
        Features (n_train, D) and (n_test, D) (float32, as encoders give them).
    y_train, y_test
        Targets (n_train, G) and (n_test, G), ``log1p`` counts.
    latent_dim
        PCA components; clipped to ``min(latent_dim, n_train, D)`` (HEST's scikit-learn PCA would raise
        there; the number used is returned).
    seed
        ``random_state`` of PCA and Ridge (HEST's default seed is 1).

    Returns
    -------
    Per-gene Pearson r (G,) (NaN for a gene constant in the test split or its predictions), and
    ``{"n_components", "alpha", "predictions"}`` (predictions (n_test, G)).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = int(min(latent_dim, x_train.shape[0], x_train.shape[1]))
    if n_comp < latent_dim:
        logger.info("PCA-%d clipped to %d components (n_train=%d, D=%d).", latent_dim, n_comp, *x_train.shape)
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_comp, random_state=seed))])
    z_train = pipe.fit_transform(x_train).astype(np.float32)
    z_test = pipe.transform(x_test).astype(np.float32)
    alpha = 100 / (z_train.shape[1] * y_train.shape[1])
    reg = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=seed)
    reg.fit(z_train, y_train)
    pred = reg.predict(z_test)
    r = per_gene_pearson(pred, y_test, [str(i) for i in range(y_test.shape[1])])["pcc"].to_numpy()
    return r, {"n_components": n_comp, "alpha": alpha, "predictions": pred}


def hest_probe_task(
    task: HESTTask, *, latent_dim: int = 256, seed: int = 1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The HEST linear probe on every split of a loaded task.

    Each split is scored by :func:`~genedml_sd.tl.hest_linear_probe`.

    Returns
    -------
    The rows of :func:`~genedml_sd.tl.hest_benchmark` for this task (per split, then ``"mean"`` and ``"sd"``) and its
    per-gene records ``{task, split, gene, pearson}``.
    """
    rows: list[dict[str, Any]] = []
    per_gene: list[dict[str, Any]] = []
    for i, (train_ids, test_ids) in enumerate(task.splits):
        (x_tr, y_tr), (x_te, y_te) = task.stack(train_ids), task.stack(test_ids)
        r, info = hest_linear_probe(x_tr, y_tr, x_te, y_te, latent_dim=latent_dim, seed=seed)
        if np.isnan(r).any():
            bad = [g for g, v in zip(task.genes, r, strict=True) if np.isnan(v)]
            logger.warning("Task %s split %d: Pearson r undefined (constant) for %s.", task.name, i, bad)
        rows.append(
            {
                "task": task.name,
                "split": i,
                "n_train": len(y_tr),
                "n_test": len(y_te),
                "pearson_mean": float(np.mean(r)),  # np.mean as HEST: NaN if a gene's r is undefined
                "pearson_std": float(np.std(r)),
                "n_components": info["n_components"],
                "alpha": info["alpha"],
            }
        )
        per_gene += [
            {"task": task.name, "split": i, "gene": g, "pearson": float(v)} for g, v in zip(task.genes, r, strict=True)
        ]
    means = np.array([row["pearson_mean"] for row in rows])
    rows.append({"task": task.name, "split": "mean", "pearson_mean": float(np.mean(means))})
    rows.append({"task": task.name, "split": "sd", "pearson_mean": float(np.std(means))})  # ddof 0, as HEST
    return rows, per_gene


def hest_benchmark(
    bench_dir: str | Path,
    encoder: str | FrozenEncoder = "stain-texture",
    tasks: Sequence[str] | None = None,
    *,
    pretrained: bool = True,
    gene_list: str = "var_50genes.json",
    latent_dim: int = 256,
    seed: int = 1,
    batch_size: int = 128,
    device: str | None = None,
    precision: str = "auto",
) -> pd.DataFrame:
    """HEST-Benchmark linear probe of a frozen encoder: per-gene Pearson r of PCA + ridge, per task and split.

    For every task, each sample's 224 px patches (112 µm at 0.5 µm/px) are encoded once; for every split
    ``i``, the features of the samples of ``train_i.csv`` fit ``StandardScaler -> PCA -> Ridge`` and the
    samples of ``test_i.csv`` are scored (:func:`~genedml_sd.tl.hest_linear_probe`): the Pearson r of each gene over all
    test spots, averaged over genes. Targets are ``log1p`` of the raw counts of the task's genes.
    As HEST-Library does (``src/hest/bench/benchmark.py``), a task's score is the mean over its splits and
    its spread their population standard deviation (``np.std``, ddof 0).

    PCA must stay on: without it ridge with HEST's fixed alpha does much worse on wide features and
    encoders of different widths are not comparable (HEST issue #50, "Reproduce benchmark results";
    ``dimreduce="PCA"`` is HEST's default). Hence PCA is not optional here.

    Parameters
    ----------
    bench_dir
        Folder of task folders (``<bench_dir>/<task>/splits/...``), or one task folder.
    encoder
        Frozen encoder name (``"stain-texture"`` works offline) or a loaded
        :class:`~genedml_sd.encoders.FrozenEncoder`.
    tasks
        Task folder names; ``None``: every sub-folder with ``splits/``.
    pretrained
        With an encoder name: ``False`` for random-init weights (tests only).
    gene_list
        Gene list file of each task (``{"genes": [...]}``).
    latent_dim
        PCA components (256 in HEST), clipped to ``min(latent_dim, n_train_spots, D)``.
    seed
        ``random_state`` of PCA and Ridge (HEST's default 1).
    batch_size
        Tiles per encoder call.
    device, precision
        Torch device (``None``: CUDA when available) and encoder autocast (``"auto"``: none on the CPU).

    Returns
    -------
    One row per task and split: ``task``, ``split`` (0, 1, ...), ``n_train``, ``n_test`` (spots),
    ``pearson_mean`` (mean over genes), ``pearson_std`` (over genes), ``n_components``, ``alpha``; then
    per task a ``split="mean"`` and a ``split="sd"`` row (``pearson_mean`` over splits). ``df.attrs``:
    ``"per_gene"`` (records ``{task, split, gene, pearson}``: ``pd.DataFrame(df.attrs["per_gene"])``),
    ``"genes"`` (per task),
    ``"encoder"``, ``"encoder_fingerprint"``, ``"latent_dim"``, ``"seed"``, ``"feature_seconds"`` (per task).

    Raises
    ------
    FileNotFoundError
        No such folder, a task without ``splits/``, unpaired split files, a missing patch, adata or gene file.
    KeyError
        A patch file without ``img`` / ``coords`` / ``barcode``, a gene list without ``"genes"``, genes or
        barcodes missing from an adata file. Every message names the file.
    ValueError
        Split files without the columns ``sample_id, patches_path, expr_path``, or a sample in train and test.
    """
    from ._fit import resolve_encoder

    dirs = task_dirs(bench_dir, tasks)
    enc, _ = resolve_encoder(encoder, pretrained=pretrained)
    rows: list[dict[str, Any]] = []
    per_gene: list[dict[str, Any]] = []
    genes_of: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for task_dir in dirs:
        t0 = time.perf_counter()
        task = load_hest_task(
            task_dir, enc, gene_list=gene_list, batch_size=batch_size, device=device, precision=precision
        )
        seconds[task.name] = time.perf_counter() - t0
        genes_of[task.name] = task.genes
        task_rows, task_genes = hest_probe_task(task, latent_dim=latent_dim, seed=seed)
        rows += task_rows
        per_gene += task_genes
    out = pd.DataFrame(rows).astype({"split": object})
    out.attrs.update(
        {
            "per_gene": per_gene,
            "genes": genes_of,
            "encoder": enc.name,
            "encoder_fingerprint": enc.fingerprint,
            "latent_dim": latent_dim,
            "seed": seed,
            "feature_seconds": seconds,
        }
    )
    return out
