"""``gd.tl.predict``: write predicted expression as a new table annotating the spots."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd import __version__
from genedml_sd._spatial import (
    ATTRS_KEY,
    PREDICTIONS_KIND,
    get_pixel_size,
    sample_info,
    spot_radius_px,
    tables_annotating,
)

from ._data import resolve_slide_keys
from ._ensemble import (
    SD_LAYER,
    UNCERTAINTY_KEY,
    check_ensemble,
    ensemble_predictions,
    mean_reliability,
    observation_uncertainty,
)
from ._features import TABLE_MODE
from ._model import TrainedModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder
    from genedml_sd.tiling import TileGeometry

logger = logging.getLogger(__name__)

FEW_SHARED_GENES = 0.5
"""``predict`` warns when a counts table of the slide measures fewer than this fraction of the model's genes."""


def predict(
    sdata: SpatialData,
    model: TrainedModel | Sequence[TrainedModel],
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
    overview_px: int | None = 2000,
    features_key: str | None = None,
) -> AnnData | None:
    """Predict gene expression for every spot and add it as a table annotating the spots.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image and a circles element (no counts table needed).
    model
        A model from :func:`genedml_sd.tl.fit` or :meth:`TrainedModel.load <genedml_sd.tl.TrainedModel.load>`;
        or a list of models of one recipe (a seed ensemble, :func:`~genedml_sd.tl.fit_ensemble`): the
        prediction is their mean and their spread is stored as an uncertainty (see Returns).
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
        Add the table to ``sdata`` (default) and return ``None``; with ``False`` return it only. When
        ``sdata`` is backed by a zarr store the new table is also written to it (only that element).
    overview_px
        Longest side (px) of the image copy stored in ``uns["spatial"]`` so that scanpy / squidpy plots
        (``sq.pl.spatial_scatter(table, color=gene)``) draw the tissue; ``None`` stores no image.
    features_key
        For a model trained on a table of tile embeddings (``fit(features_key=...)``): the slide's table
        of embeddings from the same model (default: the key used in training). Ignored otherwise.

    Returns
    -------
    ``None``, or the table if ``inplace=False``. The table has predicted log-normalised expression
    in ``X`` (spots x genes, ``var_names`` = the model's genes), ``var["reliability_pcc"]`` and
    ``var["reliability_rank"]`` (how far each gene's predictions can be trusted, estimated without
    this slide: each gene's PCC on the model's validation sections),
    ``obs`` with the region and instance
    columns linking each row to a spot (``TableModel`` metadata set), ``obsm["spatial"]`` spot centres
    in µm of the image's full-resolution pixel frame, run metadata in ``uns["genedml_sd"]``, and
    ``uns["spatial"][library_id]`` in the scanpy / squidpy layout: ``images["hires"]`` (an overview of
    the image), ``scalefactors`` with ``tissue_hires_scalef`` (overview px per µm, since coordinates are
    in µm) and ``spot_diameter_fullres`` (median observation diameter, µm). ``library_id`` is the
    section name.

    For an ensemble, the table also has ``layers["sd"]`` (the members' standard deviation per observation
    and gene), ``obs["uncertainty"]`` (its mean over genes: larger where the members disagree, in
    log-normalised expression units), ``var["reliability_pcc"]`` as the mean of the members' validation
    PCCs, and ``uns["genedml_sd"]["ensemble"]`` (number of members and their seeds).

    Warns
    -----
    UserWarning
        When a counts table of the slide measures fewer than half of the model's genes (another
        species or gene panel?); :func:`~genedml_sd.tl.evaluate` with ``genes="shared"`` scores the
        genes both have.
    """
    from spatialdata.models import TableModel

    if not isinstance(model, TrainedModel | list | tuple):
        raise TypeError(f"model must be a TrainedModel from gd.tl.fit (or a list of them), got {type(model).__name__}.")
    members = check_ensemble(model)
    model = members[0]
    if inplace and not overwrite and (key_added in sdata.tables or _on_disk(sdata, key_added)):
        raise KeyError(f"Table {key_added!r} already exists; pass overwrite=True to replace it, or another key_added.")
    if inplace and key_added in sdata and key_added not in sdata.tables:
        raise KeyError(f"{key_added!r} already names a non-table element of this SpatialData.")
    if geometry is not None and geometry != model.geometry:
        raise ValueError(f"geometry {geometry} differs from the model's tile geometry {model.geometry}.")
    keys = resolve_slide_keys(sdata, image_key, shapes_key, None, need_table=False)

    _warn_few_shared_genes(sdata, keys.shapes_key, model.genes)
    if model.features.mode == TABLE_MODE:  # embeddings precomputed by sopa / LazySlide
        if encoder is not None:
            raise ValueError("This model was trained on a table of embeddings (features_key=); do not pass encoder=.")
        feats = model.features.read_table(
            sdata, image_key=keys.image_key, shapes_key=keys.shapes_key, features_key=features_key
        )
    else:
        if features_key is not None:
            raise ValueError(
                f"features_key={features_key!r}: this model computes its features with encoder "
                f"{model.encoder.name!r}; it was not trained on a table of embeddings."
            )
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
    pred, sd = ensemble_predictions(members, feats, device=device)

    shapes = sdata[keys.shapes_key]
    obs = pd.DataFrame(
        {"region": pd.Categorical([keys.shapes_key] * len(shapes)), "spot_id": shapes.index.to_numpy()},
        index=pd.Index([str(i) for i in shapes.index], name=None),
    )
    info = sample_info(sdata, keys.shapes_key, None, exclude=[key_added])
    from anndata import AnnData

    scores = mean_reliability(members) if len(members) > 1 else model.training.get("gene_ranking_pcc")
    if sd is not None:
        obs[UNCERTAINTY_KEY] = observation_uncertainty(sd)
    table = AnnData(X=pred.astype(np.float32, copy=False), obs=obs, var=gene_reliability(model, scores))
    if sd is not None:
        table.layers[SD_LAYER] = sd
    table.obsm["spatial"] = feats.coords_um.astype(np.float64)
    table.uns[ATTRS_KEY] = _run_metadata(model, keys, info)
    if len(members) > 1:
        table.uns[ATTRS_KEY]["ensemble"] = {
            "n_models": len(members),
            "seeds": [int(m.training.get("seed", -1)) for m in members],
        }
        table.uns[ATTRS_KEY]["gene_ranking"] = list(scores or {})  # by mean validation PCC, best first
    if overview_px is not None:
        library_id = keys.image_key  # as spatialdata-io's to_legacy_anndata names it
        radii_um = spot_radius_px(sdata, keys.shapes_key, keys.image_key) * get_pixel_size(sdata, keys.image_key)
        diameter_um = 2 * float(np.median(radii_um))
        table.uns["spatial"] = _scanpy_spatial(sdata, keys.image_key, library_id, diameter_um, overview_px)
    table = TableModel.parse(table, region=keys.shapes_key, region_key="region", instance_key="spot_id")
    if not inplace:
        return table
    store_table(sdata, key_added, table, overwrite)
    return None


def gene_reliability(model: TrainedModel, scores: dict[str, float | None] | None = None) -> pd.DataFrame:
    """``var`` of a prediction table: the model's genes with how far each can be trusted.

    ``reliability_pcc`` is the PCC of the gene's predictions on the model's validation sections (held
    out of training, never the slide predicted; on the training sections themselves, in-sample and
    optimistic, when training had no validation section: see ``uns["genedml_sd"]["reliability_source"]``),
    NaN for a gene constant there; ``reliability_rank`` ranks the genes by it (1 = most reliable).
    ``scores`` replaces the model's own per-gene PCCs (an ensemble's mean over its members).
    """
    scores = (model.training.get("gene_ranking_pcc") if scores is None else scores) or {}
    values = [scores.get(g) for g in model.genes]
    pcc = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    order = np.argsort(-np.nan_to_num(pcc, nan=-np.inf), kind="stable")
    rank = np.empty(len(pcc), dtype=np.int64)
    rank[order] = np.arange(1, len(pcc) + 1)
    var = pd.DataFrame(index=pd.Index(model.genes))
    if scores:
        var["reliability_pcc"] = pcc
        var["reliability_rank"] = rank
    return var


def store_table(sdata: SpatialData, key: str, table: AnnData, overwrite: bool) -> None:
    """Add ``table`` as ``sdata.tables[key]``, replacing one of that name only with ``overwrite``.

    When ``sdata`` is backed by a zarr store, the table is also written to it as one element
    (``SpatialData.write_element``), as sopa does, so a 10^6-row table never needs the whole object
    rewritten; the rest of the store is not touched. A table of that name on disk is replaced only
    with ``overwrite`` (checked before anything changes).
    """
    if not overwrite and (key in sdata.tables or _on_disk(sdata, key)):
        where = "" if key in sdata.tables else f" in the zarr store {sdata.path}"
        raise KeyError(f"Table {key!r} already exists{where}; pass overwrite=True to replace it, or another key_added.")
    if key in sdata.tables:
        del sdata.tables[key]
    sdata.tables[key] = table
    logger.info("Added table %r: %d observations x %d genes", key, table.n_obs, table.n_vars)
    if sdata.is_backed():
        if _on_disk(sdata, key):  # spatialdata refuses to overwrite inside its own store: delete, then write
            sdata.delete_element_from_disk(key)
        sdata.write_element(key)
        logger.info("Wrote table %r to %s", key, sdata.path)


def _on_disk(sdata: SpatialData, key: str) -> bool:
    from pathlib import Path

    return sdata.path is not None and (Path(sdata.path) / "tables" / key).exists()


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
        meta["reliability_source"] = str(model.training.get("gene_ranking_source", ""))
    return meta


def _warn_few_shared_genes(sdata: SpatialData, shapes_key: str, genes: list[str]) -> None:
    """Warn when the slide's counts tables measure few of the model's genes (e.g. a mouse slide, a human model)."""
    import warnings

    wanted = pd.Index(genes)
    for name in tables_annotating(sdata, shapes_key):
        shared = wanted.isin(sdata.tables[name].var_names)
        if shared.mean() < FEW_SHARED_GENES:
            warnings.warn(
                f"Table {name!r} of {shapes_key!r} measures only {int(shared.sum())} of the model's {len(genes)} "
                f"genes (missing e.g. {list(wanted[~shared][:5])}): is the slide from another species or gene "
                "panel? Predictions are made for all of the model's genes; gd.tl.evaluate(..., genes='shared') "
                "scores the genes both have.",
                UserWarning,
                stacklevel=3,
            )


def _scanpy_spatial(
    sdata: SpatialData, image_key: str, library_id: str, diameter_um: float, max_px: int
) -> dict[str, Any]:
    """``uns["spatial"]`` in the scanpy / squidpy layout for coordinates in µm of the image's pixel frame."""
    from genedml_sd.tiling import SlideReader

    rgb, um_per_px = SlideReader.from_sdata(sdata, image_key).overview(max_px)
    return {
        library_id: {
            "images": {"hires": rgb},
            "scalefactors": {
                "tissue_hires_scalef": 1.0 / float(np.sqrt(um_per_px[0] * um_per_px[1])),
                "spot_diameter_fullres": diameter_um,
            },
            "metadata": {"image_key": image_key, "coordinates": "µm", "hires_um_per_px": list(um_per_px)},
        }
    }
