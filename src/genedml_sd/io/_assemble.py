"""Assemble the SpatialData every platform reader returns: H&E pyramid + observations + raw-counts table."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd._spatial import ATTRS_KEY, set_pixel_size

from ._build import REGION_KEY
from ._tenx import int_counts

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

OBSERVATION_KINDS = ("spot", "bin", "cell")


def sample_metadata(
    dataset_id: str,
    *,
    platform: str,
    observation: str,
    observation_um: float,
    patient: str | None,
    section: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The sample metadata stored in ``table.uns["genedml_sd"]``.

    Keys: ``sample``, ``patient`` and ``section`` (default the dataset id), ``platform`` (and ``technology``,
    the same value, as the legacy readers write it), ``observation`` (``"spot"``, ``"bin"`` or ``"cell"``),
    ``observation_um`` (observation diameter or side in µm), plus ``extra``.
    """
    if observation not in OBSERVATION_KINDS:
        raise ValueError(f"observation must be one of {OBSERVATION_KINDS}, got {observation!r}.")
    return {
        "sample": dataset_id,
        "patient": str(patient) if patient is not None else dataset_id,
        "section": str(section) if section is not None else dataset_id,
        "platform": platform,
        "technology": platform,
        "observation": observation,
        "observation_um": float(observation_um),
        **extra,
    }


def assemble(
    *,
    image_key: str,
    image: xr.DataTree,
    um_per_px: float,
    shapes_key: str,
    shapes: gpd.GeoDataFrame,
    table: AnnData,
    instance_key: str,
    info: Mapping[str, Any],
    extra_shapes: Mapping[str, gpd.GeoDataFrame] | None = None,
) -> SpatialData:
    """Put the H&E image, the observations and their counts table together, as the package's readers return them.

    Parameters
    ----------
    image_key, image
        The H&E multiscale image element and its name; its µm/px (``um_per_px``, of ``scale0``) is recorded.
    shapes_key, shapes
        The observations (one row per table row, in the same order, index ``0..n-1``) and their name.
    table
        Counts in ``X`` (converted to ``int32`` CSR without densifying; non-integer values are an error),
        ``obs`` / ``var`` / ``obsm`` kept; ``obs`` gets ``region`` (categorical ``shapes_key``), the integer
        ``instance_key`` matching the shapes index, and categorical ``patient`` / ``section`` / ``sample``.
    instance_key
        Name of the instance column.
    info
        Sample metadata, see :func:`sample_metadata`; stored in ``table.uns["genedml_sd"]`` with
        ``image_key`` and ``shapes_key``.
    extra_shapes
        Other shapes elements to keep (e.g. cell boundaries).

    Returns
    -------
    SpatialData with ``images={image_key}``, ``shapes={shapes_key, *extra_shapes}``, ``tables={"table"}``.
    """
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    n = table.n_obs
    if len(shapes) != n:
        raise ValueError(f"{shapes_key!r} has {len(shapes)} observations but its table has {n} rows.")
    table.X = int_counts(table.X, f"sample {info.get('sample')!r} ({shapes_key})")
    obs = table.obs
    obs[REGION_KEY] = pd.Categorical([shapes_key] * n)
    obs[instance_key] = np.arange(n, dtype=np.int64)
    for key in ("patient", "section", "sample"):
        if key in info:
            obs[key] = pd.Categorical([str(info[key])] * n)
    table.uns[ATTRS_KEY] = {**info, "image_key": image_key, "shapes_key": shapes_key}
    table = TableModel.parse(table, region=shapes_key, region_key=REGION_KEY, instance_key=instance_key)
    sdata = SpatialData(
        images={image_key: image},
        shapes={shapes_key: shapes, **dict(extra_shapes or {})},
        tables={"table": table},
    )
    set_pixel_size(sdata, image_key, um_per_px)
    logger.info(
        "Built %s sample %s: %d %ss, %d genes, image %s at %.4g µm/px",
        info.get("platform"),
        info.get("sample"),
        n,
        info.get("observation"),
        table.n_vars,
        image_key,
        um_per_px,
    )
    return sdata
