"""Shared helpers for 10x Genomics outputs: folders, dataset ids, scale factors, feature-barcode matrices.

File names and keys follow spatialdata-io 0.7.1 (``spatialdata_io._constants.VisiumKeys`` / ``VisiumHDKeys``),
which follows the Space Ranger output layout.
"""

from __future__ import annotations

import json
import logging
import math
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def outs_folder(path: str | PathLike, marker: str) -> Path:
    """The Space Ranger / Xenium output folder: ``path`` itself, or ``path / "outs"`` when only that holds ``marker``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Output folder {root} does not exist.")
    if not (root / marker).exists() and (root / "outs" / marker).exists():
        return root / "outs"
    return root


def folder_id(root: Path) -> str:
    """The sample's folder name (the parent of an ``outs/`` folder)."""
    name = root.parent.name if root.name == "outs" and root.parent.name else root.name
    return name or "sample"


def h5_library_id(path: Path) -> str | None:
    """First entry of the ``library_ids`` attribute of a 10x HDF5 matrix, or ``None``."""
    import h5py

    with h5py.File(path, "r") as f:
        ids = f.attrs.get("library_ids")
    if ids is None or len(np.atleast_1d(ids)) == 0:
        return None
    first = np.atleast_1d(ids)[0]
    text = first.decode("utf-8") if isinstance(first, bytes) else str(first)
    return text or None


def find_counts_file(root: Path, counts_file: str) -> tuple[Path, str | None]:
    """The counts matrix ``counts_file`` or ``<library_id>_<counts_file>`` in ``root``, and that prefix.

    Raises
    ------
    FileNotFoundError
        Listing the ``.h5`` files present.
    """
    if (root / counts_file).is_file():
        return root / counts_file, None
    prefixed = sorted(root.glob(f"*_{counts_file}"))
    if len(prefixed) == 1:
        return prefixed[0], prefixed[0].name[: -len(counts_file) - 1]
    present = sorted(p.name for p in root.glob("*.h5"))
    what = f"several matching files {[p.name for p in prefixed]}" if prefixed else f"the .h5 files there: {present}"
    raise FileNotFoundError(
        f"No counts matrix {counts_file!r} (or '<library_id>_{counts_file}') in {root}; {what}. "
        "Pass counts_file= with the file name."
    )


def infer_dataset_id(root: Path, counts_path: Path, prefix: str | None, dataset_id: str | None) -> str:
    """Dataset id: the one passed, else the counts file's prefix, else its ``library_ids``, else the folder name.

    The choice is logged, since it names every element of the result.
    """
    if dataset_id is not None:
        return str(dataset_id)
    if prefix:
        logger.info("Dataset id %r from the counts file name %s", prefix, counts_path.name)
        return prefix
    lib = h5_library_id(counts_path)
    if lib:
        logger.info("Dataset id %r from the 'library_ids' attribute of %s", lib, counts_path)
        return lib
    name = folder_id(root)
    logger.info("Dataset id %r from the folder name (%s has no 'library_ids' attribute)", name, counts_path)
    return name


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a scale-factors JSON and check that it holds positive numbers for ``required`` keys."""
    if not path.is_file():
        raise FileNotFoundError(f"Scale factors file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Scale factors file {path} is not valid JSON: {e}") from None
    for key in required:
        value = data.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"Scale factors file {path} has no positive number {key!r} (found {value!r}).")
    return data


def downscaled_image(images: Any, reader_id: str, root: Path, sf_path: Path) -> tuple[list[Any], float, str]:
    """The hires image spatialdata-io read (else the lowres one, logged): its ``(c, y, x)`` data, scale factor, name.

    Raises
    ------
    FileNotFoundError
        When neither exists.
    """
    for source in ("hires", "lowres"):
        element = images.get(f"{reader_id}_{source}_image")
        if element is not None:
            key = f"tissue_{source}_scalef"
            return [element.data[:3]], float(read_json(sf_path, (key,))[key]), source
        logger.warning(
            "%s has no tissue_%s_image.png%s", root, source, "; using the lowres image" * (source == "hires")
        )
    raise FileNotFoundError(
        f"{root} has no tissue_hires_image.png nor tissue_lowres_image.png; pass fullres_image_file= with the H&E "
        "Space Ranger was run on."
    )


def int_counts(x: Any, where: str) -> Any:
    """Raw counts as an ``int32`` CSR matrix, checked on the stored values only (never densified).

    Raises
    ------
    ValueError
        Naming ``where`` if values are negative, not finite or not integers.
    """
    import scipy.sparse as sp

    x = x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    data = x.data
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"Counts of {where} contain NaN or infinite values.")
    if data.size and (data.min() < 0 or not np.array_equal(data, np.round(data))):
        raise ValueError(f"Counts of {where} must be non-negative integers (raw UMI counts).")
    return sp.csr_matrix((data.astype(np.int32), x.indices, x.indptr), shape=x.shape)


def relative_difference(a: float, b: float) -> float:
    """``|a / b - 1|``."""
    return abs(a / b - 1.0)


def barcode_table(table: Any, xy: np.ndarray) -> Any:
    """Counts table of spots or bins, sharing the reader's counts matrix (never copied or densified).

    ``obs`` holds ``barcode`` (also the index) and the lattice columns ``in_tissue`` / ``array_row`` / ``array_col`` when present,
    ``obsm["spatial"]`` the centres ``xy`` (n, 2).
    """
    import pandas as pd
    from anndata import AnnData

    keep = [c for c in ("in_tissue", "array_row", "array_col") if c in table.obs]
    barcodes = table.obs_names.astype(str)
    obs = pd.DataFrame({"barcode": barcodes, **{c: table.obs[c].to_numpy() for c in keep}}, index=pd.Index(barcodes))
    return AnnData(X=table.X, obs=obs, var=table.var.copy(), obsm={"spatial": xy})
