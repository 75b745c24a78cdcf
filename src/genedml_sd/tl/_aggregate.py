"""``gd.tl.aggregate_predictions``: fine predictions summed into the pseudo-spots of ``gd.pp.aggregate_bins``."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genedml_sd._spatial import (
    ATTRS_KEY,
    get_pixel_size,
    is_prediction_table,
    prediction_region,
    resolve_key,
    spots_to_pixels,
    table_annotating,
    table_rows_for_shapes,
    tables_annotating,
)
from genedml_sd.pp import aggregate_values
from genedml_sd.pp._counts import counts_matrix
from genedml_sd.pp._shapes import check_new_key

from ._predict import store_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def aggregate_predictions(
    sdata: SpatialData,
    shapes_key: str,
    *,
    pred_key: str = "gd_predictions",
    table_key: str | None = None,
    weights: Literal["library"] | None = "library",
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> AnnData | None:
    """Aggregate predictions of fine observations into the pseudo-spots made by :func:`~genedml_sd.pp.aggregate_bins`.

    Each predicted observation (bin or cell) goes to the pseudo-spot containing its centroid, exactly
    as :func:`~genedml_sd.pp.aggregate_bins` assigned the counts, and its predicted log-normalised
    expression is pooled in linear space: ``log1p(weighted mean of expm1(pred))``
    (:func:`~genedml_sd.pp.aggregate_values` with ``reduce="log1p"``). With library sizes as weights a
    perfect fine prediction gives exactly the log-normalised summed counts. The result is a
    prediction table of the pseudo-spots, so :func:`~genedml_sd.tl.evaluate` scores predictions made
    at 8 µm against counts at 56 µm.

    Parameters
    ----------
    sdata
        SpatialData holding the fine prediction table, the pseudo-spots ``shapes_key`` and their
        counts table from :func:`~genedml_sd.pp.aggregate_bins`.
    shapes_key
        The pseudo-spots (shapes element written by :func:`~genedml_sd.pp.aggregate_bins`).
    pred_key
        Prediction table of the fine observations (from :func:`~genedml_sd.tl.predict`).
    table_key
        Counts table of the pseudo-spots (its ``uns["genedml_sd"]`` holds ``side_um``, ``origin_um`` and
        ``image_key``); inferred when only one annotates ``shapes_key``.
    weights
        ``"library"``: weight each fine observation by its library size from the counts table it was
        aggregated from, when that table annotates the predicted observations (else equal weights,
        logged); ``None``: equal weights.
    key_added
        Name of the new table; default ``f"{pred_key}_{shapes_key}"``.
    overwrite
        Replace an existing table named ``key_added``; otherwise a ``KeyError``.
    inplace
        Add the table to ``sdata`` and return ``None``; with ``False`` return it only.

    Returns
    -------
    ``None``, or the table: ``X`` pooled predictions (n_pseudo_spots, n_genes) float32, ``obs`` region and
    instance columns annotating ``shapes_key`` plus ``n_predicted`` (fine observations pooled),
    ``obsm["spatial"]`` copied from the counts table, ``uns["genedml_sd"]`` the fine table's metadata with
    ``aggregated_from`` (``pred_key``), ``shapes_key`` and ``weights``.

    Raises
    ------
    ValueError
        ``pred_key`` is not a prediction table, the pseudo-spots were not made by
        :func:`~genedml_sd.pp.aggregate_bins`, or some pseudo-spots contain no predicted observation.
    KeyError
        ``key_added`` exists and ``overwrite`` is ``False``.

    Examples
    --------
    >>> gd.pp.aggregate_bins(sdata, "bins_8um", size_um=56, key_added="spots_56um")  # doctest: +SKIP
    >>> gd.tl.predict(sdata, model, shapes_key="bins_8um", key_added="pred_8um")  # doctest: +SKIP
    >>> gd.tl.aggregate_predictions(sdata, "spots_56um", pred_key="pred_8um")  # doctest: +SKIP
    >>> gd.tl.evaluate(sdata, pred_key="pred_8um_spots_56um")  # doctest: +SKIP
    """
    from anndata import AnnData
    from spatialdata.models import TableModel, get_table_keys

    resolve_key(sdata, "tables", pred_key, what="pred_key")
    pred_table = sdata.tables[pred_key]
    if not is_prediction_table(pred_table):
        raise ValueError(f"Table {pred_key!r} is not a prediction table of gd.tl.predict.")
    shapes_key = resolve_key(sdata, "shapes", shapes_key)
    table_key = table_annotating(sdata, shapes_key, table_key)
    key_added = key_added or f"{pred_key}_{shapes_key}"
    if inplace:
        check_new_key(sdata, key_added, "tables", overwrite)
    coarse = sdata.tables[table_key]
    info = dict(coarse.uns.get(ATTRS_KEY, {}))
    needed = [k for k in ("side_um", "origin_um", "image_key") if k not in info]
    if needed or "array_col" not in coarse.obs or "array_row" not in coarse.obs:
        raise ValueError(
            f"Table {table_key!r} of {shapes_key!r} lacks the pseudo-spot grid of gd.pp.aggregate_bins "
            f"(uns['genedml_sd'] entries {needed or []}, obs 'array_col' / 'array_row'): aggregate the counts "
            "with gd.pp.aggregate_bins first."
        )
    if weights not in ("library", None):
        raise ValueError(f"weights must be 'library' or None, got {weights!r}.")

    fine_key = prediction_region(sdata, pred_key)
    fine = sdata[fine_key]
    image_key = str(info["image_key"])
    centroids_um = spots_to_pixels(sdata, fine_key, image_key) * get_pixel_size(sdata, image_key)
    x = pred_table.X[table_rows_for_shapes(pred_table, fine, fine_key, pred_key)]
    w = _library_sizes(sdata, fine_key, info) if weights == "library" else None
    cells, pooled = aggregate_values(
        x, centroids_um, float(info["side_um"]), info["origin_um"], reduce="log1p", weights=w
    )
    _, n_pooled = aggregate_values(
        np.ones((len(centroids_um), 1), dtype=np.int64), centroids_um, float(info["side_um"]), info["origin_um"]
    )
    n_pooled = np.asarray(n_pooled).reshape(-1)

    grid = pd.MultiIndex.from_arrays([coarse.obs["array_col"].to_numpy(), coarse.obs["array_row"].to_numpy()])
    pos = pd.MultiIndex.from_arrays([cells[:, 0], cells[:, 1]]).get_indexer(grid)
    if (pos < 0).any():
        raise ValueError(
            f"{int((pos < 0).sum())} of the {len(pos)} pseudo-spots of {shapes_key!r} contain no observation of "
            f"{fine_key!r} predicted in {pred_key!r}: predict on the observations the counts were aggregated from."
        )
    outside = len(cells) - len(np.unique(pos))
    if outside:
        warnings.warn(
            f"{outside} pseudo-spot cells of predicted observations of {fine_key!r} are not among the pseudo-spots "
            f"of {shapes_key!r}; their predictions are left out.",
            UserWarning,
            stacklevel=2,
        )
    values = pooled[pos]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)

    _, region_key, instance_key = get_table_keys(coarse)
    obs = pd.DataFrame(
        {
            region_key: pd.Categorical([shapes_key] * coarse.n_obs),
            instance_key: coarse.obs[instance_key].to_numpy(),
            "n_predicted": n_pooled[pos].astype(np.int64),
        },
        index=coarse.obs_names.copy(),
    )
    table = AnnData(X=values.astype(np.float32), obs=obs, var=pd.DataFrame(index=pred_table.var_names.copy()))
    if "spatial" in coarse.obsm:
        table.obsm["spatial"] = np.asarray(coarse.obsm["spatial"]).copy()
    meta: dict[str, Any] = dict(pred_table.uns.get(ATTRS_KEY, {}))
    meta.pop("evaluation", None)
    meta.update(aggregated_from=pred_key, shapes_key=shapes_key, weights=weights or "equal")
    table.uns[ATTRS_KEY] = meta
    table = TableModel.parse(table, region=shapes_key, region_key=region_key, instance_key=instance_key)
    if not inplace:
        return table
    store_table(sdata, key_added, table, overwrite)
    return None


def _library_sizes(sdata: SpatialData, fine_key: str, info: dict[str, Any]) -> np.ndarray | None:
    """Library size of each fine observation (shapes order) from its counts table, or ``None`` if it has none."""
    source = info.get("aggregated_from_table")
    names = tables_annotating(sdata, fine_key)
    name = source if source in names else (names[0] if len(names) == 1 else None)
    if name is None:
        logger.info("No counts table annotates %r: pooling its predictions with equal weights.", fine_key)
        return None
    table = sdata.tables[name]
    rows = table_rows_for_shapes(table, sdata[fine_key], fine_key, name)
    x = counts_matrix(table, info.get("aggregated_from_layer"), name)
    return np.asarray(x[rows].sum(axis=1), dtype=np.float64).reshape(-1)
