"""A HEST-Benchmark task folder written from real HER2ST sections (pixels and counts).

Layout and keys checked against HEST-Library (github.com/mahmoodlab/HEST, commit afd42c3, read only):

- ``<task>/splits/train_<i>.csv`` and ``test_<i>.csv`` with columns ``sample_id, patches_path, expr_path``
  (paths relative to the task folder, ``patches/<id>.h5`` and ``adata/<id>.h5ad``), one split per patient,
  patient ``i`` tested in split ``i`` (``src/hest/HESTData.py``, ``create_splits``);
- ``<task>/patches/<id>.h5`` with ``img`` (N, 224, 224, 3) uint8 tiles of 112 µm at 0.5 µm/px, ``coords``
  (N, 2) integer top-left corners (x, y) of the tiles in the source image (level-0 px) and ``barcode``
  (N, 1) strings, as ``HESTData.dump_patches`` writes them and hestcore's ``H5HESTDataset`` reads them;
  the tile's top-left is ``centre - patch_size_src // 2`` with ``patch_size_src = 224 * 0.5 / pixel_size``
  (``dump_patches``). Attributes ``patch_size_target``, ``patch_size_src``, ``pixel_size`` (source µm/px)
  and ``downsample`` (0.5 / pixel_size) are written on ``img`` and ``coords`` (both places are read by
  hestcore versions);
- ``<task>/adata/<id>.h5ad``: raw counts of all genes of the section (CSR), ``obs`` indexed by the
  barcodes of the patch file (``array_row``, ``array_col``, ``in_tissue``, ``pxl_col_in_fullres``,
  ``pxl_row_in_fullres``), ``obsm["spatial"]`` the spot centres (x, y) in source px; the benchmark reads
  ``adata[barcodes][:, genes]`` (``src/hest/bench/st_dataset.py``, ``load_adata``);
- ``<task>/var_50genes.json``: ``{"genes": [...]}``, the most variable genes as ``src/hest/utils.py``
  ``get_k_genes(criteria="var")`` chooses them: genes detected in at least 10 % of the spots of every
  sample, without ``BLANK`` / ``Control`` probes, raw counts of all samples stacked, ``log1p``, scanpy's
  ``highly_variable_genes(n_top_genes=k)``, kept in the (alphabetical) order of the common genes.

The tiles are cut from the sections' own H&E (resampled with PIL's bilinear filter to 0.5 µm/px); parts
of a tile outside the image are white. The task is real data in HEST's layout, not a HEST-1k task.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from spatialdata import SpatialData

PATCH_PX = 224
TARGET_UM_PER_PX = 0.5


@dataclass
class HESTTaskTruth:
    """What a task folder was written from.

    Attributes
    ----------
    task_dir
        The task folder (``<bench_dir>/<task>``).
    samples
        Sample ids (section names), in writing order.
    patients
        Patient of each sample.
    genes
        The genes of ``var_50genes.json``.
    splits
        ``(train sample ids, test sample ids)`` of split ``i``.
    barcodes
        Per sample, the barcodes in patch-file order.
    counts
        Per sample, raw counts of ``genes`` (n_spots, n_genes) int64, rows in patch-file order.
    centres_px
        Per sample, spot centres (x, y) in source px (n_spots, 2).
    pixel_size
        Per sample, source µm/px.
    """

    task_dir: Path
    samples: list[str]
    patients: list[str]
    genes: list[str]
    splits: list[tuple[list[str], list[str]]]
    barcodes: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    centres_px: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_size: dict[str, float] = field(default_factory=dict)


@dataclass
class _Section:
    name: str
    patient: str
    tiles: np.ndarray  # (n, 224, 224, 3) uint8, cut from the H&E (the image itself is not kept)
    topleft: np.ndarray  # (n, 2) int px
    patch_size_src: int
    um_per_px: float
    centres: np.ndarray  # (n, 2) x, y px
    obs: pd.DataFrame  # indexed by barcode: array_row, array_col
    counts: Any  # scipy CSR (n, all genes)
    genes: list[str]


def _section(sdata: SpatialData, max_spots: int | None, rng: np.random.Generator) -> _Section:
    """One HER2ST SpatialData (from :func:`genedml_sd.io.her2st`) as arrays, spots in shapes order."""
    import scipy.sparse as sp

    from genedml_sd._spatial import get_pixel_size, sample_info, spots_to_pixels, table_rows_for_shapes

    image_key = next(iter(sdata.images))
    shapes_key = next(iter(sdata.shapes))
    table = sdata.tables["table"]
    rows = table_rows_for_shapes(table, sdata[shapes_key], shapes_key, "table")
    centres = spots_to_pixels(sdata, shapes_key, image_key)
    if max_spots is not None and len(rows) > max_spots:
        keep = np.sort(rng.choice(len(rows), size=max_spots, replace=False))
        rows, centres = rows[keep], centres[keep]
    sub = table[rows]
    info = sample_info(sdata, shapes_key, "table")
    element = sdata.images[image_key]
    data = element["scale0"]["image"] if "scale0" in element else element
    obs = pd.DataFrame(
        {"array_row": sub.obs["array_row"].to_numpy(), "array_col": sub.obs["array_col"].to_numpy()},
        index=pd.Index([str(b) for b in sub.obs_names], name="barcode"),
    )
    um_per_px = float(get_pixel_size(sdata, image_key))
    centres = np.asarray(centres, dtype=np.float64)
    tiles, topleft, size = cut_patches(np.asarray(data.values).transpose(1, 2, 0), centres, um_per_px)
    return _Section(
        name=str(info["section"]),
        patient=str(info["patient"]),
        tiles=tiles,
        topleft=topleft,
        patch_size_src=size,
        um_per_px=um_per_px,
        centres=centres,
        obs=obs,
        counts=sp.csr_matrix(sub.X),
        genes=[str(g) for g in sub.var_names],
    )


def cut_patches(image: np.ndarray, centres: np.ndarray, um_per_px: float) -> tuple[np.ndarray, np.ndarray, int]:
    """224 px tiles of 112 µm at 0.5 µm/px centred on ``centres`` (x, y px of ``image``, (H, W, 3) uint8).

    Returns the tiles (N, 224, 224, 3) uint8, their integer top-left corners (N, 2) in image px and the
    side ``patch_size_src`` (px) read from the image (HEST's ``round(224 * 0.5 / um_per_px)``).
    """
    from PIL import Image

    size_f = PATCH_PX * TARGET_UM_PER_PX / um_per_px
    size = round(size_f)
    topleft = (centres - size_f // 2).astype(int)
    h, w = image.shape[:2]
    tiles = np.empty((len(centres), PATCH_PX, PATCH_PX, 3), np.uint8)
    for i, (x, y) in enumerate(topleft):
        crop = np.full((size, size, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x1 > x0 and y1 > y0:
            crop[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        tiles[i] = np.asarray(Image.fromarray(crop).resize((PATCH_PX, PATCH_PX), Image.Resampling.BILINEAR))
    return tiles, topleft, size


def variable_genes(sections: Sequence[_Section], k: int, min_cells_pct: float = 0.10) -> list[str]:
    """HEST's ``get_k_genes(criteria="var")`` on the sections' raw counts (see the module docstring)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    common: np.ndarray | None = None
    for s in sections:
        detected = np.asarray((s.counts > 0).sum(axis=0)).ravel()
        kept = np.asarray(s.genes)[detected >= np.ceil(min_cells_pct * len(s.obs))]
        common = kept if common is None else np.intersect1d(common, kept)
    genes = [g for g in np.unique(common if common is not None else []) if "BLANK" not in g and "Control" not in g]
    if len(genes) < k:
        raise ValueError(f"Only {len(genes)} genes are detected in 10 % of the spots of every section; need {k}.")
    stacked = sp.vstack([s.counts[:, pd.Index(s.genes).get_indexer(genes)] for s in sections])
    adata = ad.AnnData(sp.csr_matrix(stacked, dtype=np.float32), var=pd.DataFrame(index=genes))
    sc.pp.filter_genes(adata, min_cells=0)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=k)
    return [str(g) for g in adata.var_names[adata.var["highly_variable"].to_numpy()][:k]]


def _write_patches(path: Path, tiles: np.ndarray, topleft: np.ndarray, barcodes: list[str], attrs: dict) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        img = f.create_dataset("img", data=tiles, chunks=(1, *tiles.shape[1:]))
        coords = f.create_dataset("coords", data=topleft.astype(np.int64))
        f.create_dataset(
            "barcode", data=np.array(barcodes, dtype=object)[:, None], dtype=h5py.string_dtype(encoding="utf-8")
        )
        for dset in (img, coords):
            for key, value in attrs.items():
                dset.attrs[key] = value


def _write_adata(path: Path, s: _Section) -> None:
    import anndata as ad

    obs = s.obs.copy()
    obs["in_tissue"] = 1
    obs["pxl_col_in_fullres"] = s.centres[:, 0]
    obs["pxl_row_in_fullres"] = s.centres[:, 1]
    adata = ad.AnnData(
        s.counts.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(s.genes, name="gene")),
        obsm={"spatial": s.centres.copy()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


def write_hest_task(
    bench_dir: str | Path,
    slides: Iterable[SpatialData],
    *,
    task: str = "HER2ST",
    n_genes: int = 50,
    max_spots: int | None = None,
    seed: int = 0,
) -> HESTTaskTruth:
    """Write ``<bench_dir>/<task>`` in the HEST-Benchmark layout from HER2ST sections.

    Parameters
    ----------
    bench_dir
        Benchmark root (created if needed); ``<task>`` must not exist in it yet.
    slides
        HER2ST sections as read by :func:`genedml_sd.io.her2st` (one image, spots and counts table each);
        their section names are the sample ids and their patients define the splits. Each image is
        read once, cut into tiles and dropped (pass a generator to hold one section at a time).
    task
        Task folder name.
    n_genes
        Size of the gene list; it is written as ``var_50genes.json`` whatever ``n_genes`` (the file name
        the benchmark reads by default).
    max_spots
        Keep at most this many spots per section (a seeded random subset, in shapes order), for fast tests.
    seed
        Seed of that subset.

    Returns
    -------
    :class:`HESTTaskTruth`: ids, patients, genes, splits and the counts, barcodes and centres written.

    Raises
    ------
    FileExistsError
        ``<bench_dir>/<task>`` exists.
    ValueError
        Fewer than two patients (no split), duplicate section names, or too few common genes.
    """
    task_dir = Path(bench_dir) / task
    if task_dir.exists():
        raise FileExistsError(f"{task_dir} exists; write_hest_task writes a new task folder (nothing is overwritten).")
    rng = np.random.default_rng(seed)
    sections = [_section(s, max_spots, rng) for s in slides]
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise ValueError(f"Section names must be unique, got {names}.")
    patients = sorted({s.patient for s in sections})
    if len(patients) < 2:
        raise ValueError(f"A HEST task needs at least two patients (one split each), got {patients}.")
    genes = variable_genes(sections, n_genes)
    truth = HESTTaskTruth(task_dir, names, [s.patient for s in sections], genes, [])
    for s in sections:
        attrs = {
            "patch_size_target": PATCH_PX,
            "patch_size_src": s.patch_size_src,
            "pixel_size": s.um_per_px,
            "downsample": TARGET_UM_PER_PX / s.um_per_px,
        }
        barcodes = s.obs.index.tolist()
        _write_patches(task_dir / "patches" / f"{s.name}.h5", s.tiles, s.topleft, barcodes, attrs)
        _write_adata(task_dir / "adata" / f"{s.name}.h5ad", s)
        cols = pd.Index(s.genes).get_indexer(genes)
        truth.barcodes[s.name] = barcodes
        truth.counts[s.name] = np.asarray(s.counts[:, cols].toarray(), dtype=np.int64)
        truth.centres_px[s.name] = s.centres
        truth.pixel_size[s.name] = s.um_per_px
    (task_dir / "splits").mkdir(parents=True)
    for i, patient in enumerate(patients):
        test = [s.name for s in sections if s.patient == patient]
        train = [s.name for s in sections if s.patient != patient]
        for kind, ids in (("train", train), ("test", test)):
            frame = pd.DataFrame(
                {
                    "sample_id": ids,
                    "patches_path": [f"patches/{x}.h5" for x in ids],
                    "expr_path": [f"adata/{x}.h5ad" for x in ids],
                }
            )
            frame.to_csv(task_dir / "splits" / f"{kind}_{i}.csv", index=False)
        truth.splits.append((train, test))
    (task_dir / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    return truth
