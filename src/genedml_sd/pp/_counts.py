"""Access to and checks of the raw counts of a table, sparse-aware and without densifying.

Every function here reads a scipy CSR / CSC matrix through its stored values (``.data``) in chunks
of :data:`CHUNK` values, so that time is O(nnz) and extra memory O(chunk); a dense array is read in
blocks of rows of about the same number of values. Other sparse formats (COO, ...) are converted to
CSR first, and CSR / CSC matrices with duplicated entries are summed into a copy (both O(nnz)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData

CHUNK = 1 << 22
"""Number of stored values (or dense elements) processed at once: 32 MB of float64 temporaries."""

_LOG_LIKE_MAX = 30.0
"""Non-integer data whose largest value is below this looks log-normalised (log1p of 1e4 is 9.2)."""


def _where(table_key: str, slide: str | None, start: bool = False) -> str:
    """``"table 'x'"`` or ``"table 'x' of slide 'y'"`` (``"Table ..."`` with ``start``), for messages."""
    return ("Table" if start else "table") + f" {table_key!r}" + (f" of slide {slide!r}" if slide is not None else "")


def counts_matrix(table: AnnData, layer: str | None, table_key: str = "table", slide: str | None = None) -> Any:
    """The counts of ``table``: ``table.layers[layer]``, or ``table.X`` when ``layer`` is ``None``.

    Sparse matrices in CSR or CSC format with duplicated entries are summed into a copy and other
    sparse formats converted to CSR; anything else is returned as a numpy array. ``table`` is never
    modified. Raises a ``KeyError`` listing the available layers when ``layer`` is missing.
    """
    if layer is not None:
        if layer not in table.layers:
            raise KeyError(
                f"Layer {layer!r} is not in {_where(table_key, slide)}; its layers are {list(table.layers)}"
                + ("" if len(table.layers) else " (none): pass layer=None to use table.X")
                + "."
            )
        x = table.layers[layer]
    else:
        x = table.X
        if x is None:
            raise ValueError(
                f"{_where(table_key, slide, start=True)} has no X; pass layer=... naming the layer with the raw "
                f"counts (layers: {list(table.layers)})."
            )
    return as_compressed(x)


def as_compressed(x: Any) -> Any:
    """CSR / CSC matrix without duplicated entries (a copy only when needed), or a numpy array."""
    if not sp.issparse(x):
        return np.asarray(x)
    if x.format not in ("csr", "csc"):
        return x.tocsr()
    if not x.has_canonical_format:
        x = x.copy()
        x.sum_duplicates()
    return x


def _value_chunks(x: Any) -> Iterator[np.ndarray]:
    """Stored values of a CSR / CSC matrix (1-D chunks) or blocks of rows of a dense array."""
    if sp.issparse(x):
        for a in range(0, len(x.data), CHUNK):
            yield x.data[a : a + CHUNK]
        return
    if x.ndim != 2:
        raise ValueError(f"Counts must be a 2-D matrix (spots x genes), got shape {x.shape}.")
    step = max(1, CHUNK // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        yield x[a : a + step]


def _nnz_rows(x: Any, a: int, b: int) -> np.ndarray:
    """Row of each stored value ``a:b`` of a CSR / CSC matrix."""
    if x.format == "csc":
        return x.indices[a:b]
    return np.searchsorted(x.indptr, np.arange(a, b), side="right") - 1


def library_sizes(x: Any) -> np.ndarray:
    """Total counts of each spot, float64 (n_spots,), summed over all genes of ``x``.

    ``x`` is a CSR / CSC matrix (as from :func:`counts_matrix`) or a dense array (n_spots, n_genes).
    Integer counts are summed exactly.
    """
    n = x.shape[0]
    lib = np.zeros(n, dtype=np.float64)
    if sp.issparse(x):
        for a in range(0, len(x.data), CHUNK):
            b = min(a + CHUNK, len(x.data))
            lib += np.bincount(_nnz_rows(x, a, b), weights=x.data[a:b].astype(np.float64), minlength=n)
        return lib
    step = max(1, CHUNK // max(1, x.shape[1]))
    for a in range(0, n, step):
        lib[a : a + step] = x[a : a + step].astype(np.float64).sum(axis=1)
    return lib


def _scan(x: Any) -> dict[str, Any]:
    """Non-finite count, minimum, maximum and the first non-integer value of the counts."""
    found: dict[str, Any] = {"n_nonfinite": 0, "min": None, "max": None, "n_nonint": 0, "nonint": None}
    kind = x.dtype.kind
    if kind not in "biuf":
        raise ValueError(f"Counts must be numbers, got dtype {x.dtype}.")
    for c in _value_chunks(x):
        if c.size == 0:
            continue
        if kind == "f":
            finite = np.isfinite(c)
            if not finite.all():
                found["n_nonfinite"] += int(c.size - np.count_nonzero(finite))
                c = c[finite]
                if c.size == 0:
                    continue
            frac = c != np.floor(c)
            if frac.any():
                found["n_nonint"] += int(np.count_nonzero(frac))
                if found["nonint"] is None:
                    found["nonint"] = float(c[frac].flat[0])
        lo, hi = float(c.min()), float(c.max())
        found["min"] = lo if found["min"] is None else min(found["min"], lo)
        found["max"] = hi if found["max"] is None else max(found["max"], hi)
    return found


def check_counts_matrix(
    x: Any, *, layer: str | None = None, table_key: str = "table", slide: str | None = None, layers: Any = ()
) -> None:
    """Check that a counts matrix is finite, non-negative and integer-valued; see :func:`check_raw_counts`."""
    found = _scan(x)
    where = _where(table_key, slide)
    source = "X" if layer is None else f"layers[{layer!r}]"
    if found["n_nonfinite"]:
        raise ValueError(
            f"The counts of {where} ({source}) have {found['n_nonfinite']} NaN or infinite values. "
            "Raw counts are finite: fix or drop those spots / genes first."
        )
    problems = []
    negative = found["min"] is not None and found["min"] < 0
    if negative:
        problems.append(f"negative values (min {found['min']:.4g}; looks scaled or centred)")
    if found["nonint"] is not None:
        looks = "" if negative else "; looks log-normalised" if found["max"] <= _LOG_LIKE_MAX else "; looks normalised"
        problems.append(
            f"{found['n_nonint']} non-integer values such as {found['nonint']:.4g} (max {found['max']:.4g}{looks})"
        )
    if not problems:
        return
    available = [str(k) for k in layers]
    others = [k for k in available if k != layer]
    example = repr(others[0]) if others else "'counts'"
    raise ValueError(
        f"The counts of {where} ({source}) are not raw counts: found {' and '.join(problems)}. Gene selection "
        "and normalisation need raw (non-negative integer) counts: pass layer=... naming the layer that holds "
        f"them (e.g. layer={example} for table.layers[{example}]; layers of this table: {available}), or set "
        f"table.X = table.layers[{example}] first."
    )


def check_raw_counts(
    table: AnnData, *, layer: str | None = None, table_key: str = "table", slide: str | None = None
) -> None:
    """Check that a table holds raw counts: finite, non-negative and integer-valued.

    Library-size normalisation followed by ``log1p`` is only meaningful on raw counts; a table whose
    ``X`` is already log-normalised (as after ``sc.pp.normalize_total`` and ``sc.pp.log1p``) or
    scaled would otherwise be normalised again without notice.

    Every stored value is checked (no sampling): sparse CSR / CSC matrices through their stored
    values (``.data``) only, dense arrays by blocks of rows, in chunks of
    ``CHUNK`` values, so time is O(nnz) and extra memory bounded by the
    chunk size; a sparse matrix is never densified. Integer dtypes need no integer check.

    Parameters
    ----------
    table
        Table with spots as observations and genes as variables.
    layer
        Read the counts from ``table.layers[layer]`` (e.g. ``"counts"``) instead of ``table.X``.
    table_key
        Name of the table, for messages.
    slide
        Name of the slide (section) the table belongs to, for messages.

    Raises
    ------
    KeyError
        If ``layer`` is not among ``table.layers`` (the message lists those present).
    ValueError
        If the counts (n_spots, n_genes) contain NaN or infinite values, negative values or
        non-integer values; the message names the table (and slide), says what was found (e.g. an
        example value and whether it looks log-normalised) and how to pass the raw counts.

    Examples
    --------
    >>> import genedml_sd as gd
    >>> (b4,) = gd.datasets.her2st_demo(["B4"])
    >>> gd.pp.check_raw_counts(b4.tables["table"])
    """
    x = counts_matrix(table, layer, table_key, slide)
    check_counts_matrix(x, layer=layer, table_key=table_key, slide=slide, layers=table.layers.keys())


def check_unique_var_names(table: AnnData, table_key: str = "table", slide: str | None = None) -> None:
    """Raise a ``ValueError`` naming a few duplicated gene names of ``table``."""
    names = table.var_names
    if names.is_unique:
        return
    dup = names[names.duplicated()].unique()
    raise ValueError(
        f"{_where(table_key, slide, start=True)} has {len(dup)} duplicated gene names (var_names), e.g. "
        f"{[str(g) for g in dup[:5]]}; genes must be unique. Call table.var_names_make_unique() on it "
        "(or aggregate the duplicated genes) first."
    )
