"""``gd.tl.predict``: write predicted expression as a new table annotating the spots."""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd import __version__
from genedml_sd._spatial import ATTRS_KEY, PREDICTIONS_KIND, sample_info

from ._data import resolve_slide_keys
from ._model import TrainedModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder
    from genedml_sd.tiling import TileGeometry

logger = logging.getLogger(__name__)


def predict(
    sdata: SpatialData,
    model: TrainedModel,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    key_added: str = "gd_predictions",
    overwrite: bool = False,
    encoder: FrozenEncoder | None = None,
    geometry: TileGeometry | None = None,
    hf_token: str | None = None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    device: str | None = None,
    inplace: bool = True,
) -> AnnData | None:
    """Predict gene expression for every spot and add it as a table annotating the spots.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image and a circles element (no counts table needed).
    model
        A model from :func:`genedml_sd.tl.fit` or :meth:`TrainedModel.load <genedml_sd.tl.TrainedModel.load>`.
    image_key, shapes_key
        Elements to use; inferred when unambiguous.
    key_added
        Name of the new table.
    overwrite
        Replace an existing table named ``key_added``; otherwise that is an error.
    encoder
        An already loaded frozen encoder; by default the model's encoder is loaded again. It must
        have the same fingerprint (architecture and weights) as the one used in training.
    geometry
        Must equal the model's tile geometry if given (a different geometry is an error).
    hf_token
        Hugging Face token, to reload a gated encoder.
    cache_dir, num_workers, device
        Feature cache location, tile-decoding workers, and torch device.
    inplace
        Add the table to ``sdata`` (default) and return ``None``; with ``False`` return it only.

    Returns
    -------
    ``None``, or the table if ``inplace=False``. The table has predicted log-normalised expression
    in ``X`` (spots x genes, ``var_names`` = the model's genes), ``obs`` with the region and instance
    columns linking each row to a spot (``TableModel`` metadata set), ``obsm["spatial"]`` spot centres
    in µm, and run metadata in ``uns["genedml_sd"]``.
    """
    from spatialdata.models import TableModel

    if not isinstance(model, TrainedModel):
        raise TypeError(f"model must be a TrainedModel from gd.tl.fit, got {type(model).__name__}.")
    if inplace and key_added in sdata.tables and not overwrite:
        raise KeyError(f"Table {key_added!r} already exists; pass overwrite=True to replace it, or another key_added.")
    if inplace and key_added in sdata and key_added not in sdata.tables:
        raise KeyError(f"{key_added!r} already names a non-table element of this SpatialData.")
    if geometry is not None and geometry != model.geometry:
        raise ValueError(f"geometry {geometry} differs from the model's tile geometry {model.geometry}.")
    keys = resolve_slide_keys(sdata, image_key, shapes_key, None, need_table=False)

    if encoder is None:
        encoder = model.encoder.load(hf_token=hf_token)
    model.encoder.check(encoder)
    # features made exactly the way the model was trained on (encoder, geometry, mode, scales)
    feats = model.features.extract(
        sdata,
        encoder,
        image_key=keys.image_key,
        shapes_key=keys.shapes_key,
        cache_dir=cache_dir,
        num_workers=num_workers,
        device=device,
    )
    pred = model.predict_features(feats, device=device)

    shapes = sdata[keys.shapes_key]
    obs = pd.DataFrame(
        {"region": pd.Categorical([keys.shapes_key] * len(shapes)), "spot_id": shapes.index.to_numpy()},
        index=pd.Index([str(i) for i in shapes.index], name=None),
    )
    info = sample_info(sdata, keys.shapes_key, None, exclude=[key_added])
    from anndata import AnnData

    table = AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(model.genes)))
    table.obsm["spatial"] = feats.coords_um.astype(np.float64)
    table.uns[ATTRS_KEY] = _run_metadata(model, keys, info)
    table = TableModel.parse(table, region=keys.shapes_key, region_key="region", instance_key="spot_id")
    if not inplace:
        return table
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    sdata.tables[key_added] = table
    logger.info("Added table %r: %d spots x %d genes", key_added, table.n_obs, table.n_vars)
    return None


def _run_metadata(model: TrainedModel, keys: Any, info: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "kind": PREDICTIONS_KIND,
        "method": model.method,
        "image_key": keys.image_key,
        "shapes_key": keys.shapes_key,
        "encoder": model.encoder.name,
        "encoder_fingerprint": model.encoder.fingerprint,
        "geometry": model.geometry.to_dict(),
        "feature_mode": model.features.mode,
        "normalization": dict(model.normalization),
        "trained_on": list(model.training.get("sections", [])),
        "section": str(info.get("section", keys.shapes_key)),
        "patient": str(info.get("patient", "")),
        "genedml_sd_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if model.training.get("gene_ranking"):
        # genes ranked on training data only: the leak-free PCC(H) of gd.tl.evaluate uses it
        meta["gene_ranking"] = list(model.training["gene_ranking"])
    return meta
