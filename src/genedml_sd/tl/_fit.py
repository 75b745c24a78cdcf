"""``gd.tl.fit``: train Gene-DML on one or more SpatialData slides."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._docs import docs
from genedml_sd._settings import settings
from genedml_sd.pp import TARGET_SUM, select_genes
from genedml_sd.tiling import TileGeometry

from ._data import as_list, resolve_slide_keys, slide_info, slide_tensors
from ._features import TABLE_MODE, EncoderRef, FeatureSpec, choose_feature_mode
from ._model import TrainedModel

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder, StainNormalizer

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "uni"
"""The encoder of :func:`fit` by default: UNI, the paper's."""


def resolve_encoder(
    encoder: str | FrozenEncoder,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    hf_token: str | None = None,
    tta: str | None = None,
    stain_norm: StainNormalizer | None = None,
) -> tuple[FrozenEncoder, EncoderRef]:
    """Load an encoder by name (or accept a loaded one) and return it with its reference.

    ``tta`` / ``stain_norm`` are applied to a loaded encoder too (replacing its own) when given.
    """
    from genedml_sd.encoders import FrozenEncoder, load_encoder

    if not isinstance(encoder, str | FrozenEncoder):
        raise TypeError(
            f"encoder must be a registered name, 'timm:<name>', 'hf-hub:<org>/<repo>' or a FrozenEncoder, got "
            f"{type(encoder).__name__}; wrap your own network (B, 3, H, W) -> (B, D) once with "
            "gd.encoders.wrap_encoder(module, name=..., mean=..., std=...) and pass the result."
        )
    if isinstance(encoder, str):
        loaded = load_encoder(
            encoder, pretrained=pretrained, weights=weights, hf_token=hf_token, tta=tta, stain_norm=stain_norm
        )
    elif tta is not None or stain_norm is not None:
        loaded = encoder.with_transforms(tta=tta, stain_norm=stain_norm)
    else:
        loaded = encoder
    return loaded, EncoderRef.of(loaded, pretrained=pretrained, weights=None if weights is None else str(weights))


def _split_validation(infos: list[dict], val_sections: int | str | Sequence[str] | None, seed: int) -> list[int]:
    """Indices of training slides held out for validation (never from the test data)."""
    n = len(infos)
    if val_sections == "auto":
        val_sections = 1 if n >= 3 else None
    if val_sections is None or val_sections == 0:
        return []
    if val_sections == "patient":
        return _patient_validation(infos, seed)
    if isinstance(val_sections, str):
        raise ValueError(
            f"val_sections must be 'auto', 'patient', a number, a list of section names or None, got "
            f"{val_sections!r} (for one section, pass [{val_sections!r}])."
        )
    if isinstance(val_sections, int | np.integer):
        if val_sections >= n:
            raise ValueError(f"val_sections={val_sections} leaves no training slide out of {n}.")
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(n, size=int(val_sections), replace=False).tolist())
    names = [str(i["section"]) for i in infos]
    missing = [v for v in val_sections if v not in names]
    if missing:
        raise KeyError(f"Validation sections {missing} are not among the training sections {names}.")
    return [names.index(v) for v in val_sections]


def _patient_validation(infos: list[dict], seed: int) -> list[int]:
    """All slides of one training patient, the one with the fewest slides (ties broken with ``seed``).

    Falls back to ``"auto"`` (one slide of any patient, if at least three slides) when fewer than two
    patients are present or fewer than two slides would remain for training.
    """
    patients = [str(i["patient"]) for i in infos]
    sizes = {p: patients.count(p) for p in sorted(set(patients))}
    rng = np.random.default_rng(seed)
    order = sorted(sizes, key=lambda p: (sizes[p], rng.random()))
    if len(sizes) < 2 or len(infos) - sizes[order[0]] < 2:
        logger.info("val_sections='patient' needs two patients and two slides left to train on: using 'auto'.")
        return _split_validation(infos, "auto", seed)
    return [i for i, p in enumerate(patients) if p == order[0]]


@docs
def fit(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    genes: int | Sequence[str] = 250,
    gene_flavor: str = "variance",
    encoder: str | FrozenEncoder = DEFAULT_ENCODER,
    method: str = "gene-dml",
    pretrained: bool = True,
    weights: str | None = None,
    hf_token: str | None = None,
    geometry: TileGeometry | None = None,
    config: str | dict | Any = "full",
    max_epochs: int = 100,
    batch_size: int = 256,
    mix_slides: bool = False,
    val_sections: int | str | Sequence[str] | None = "auto",
    patience: int = 10,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    extraction_device: str | None = None,
    feature_mode: str = "auto",
    features_key: str | None = None,
    slide_standardise: bool = False,
    tta: str | None = None,
    stain_norm: StainNormalizer | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> TrainedModel:
    """Train Gene-DML (or another registered method) on slides with H&E, spots and a counts table.

    Frozen-encoder features of every spot (local tile and 5x5 neighbour grid) are computed once and
    cached; then the trainable model (for Gene-DML: per-scale projections, neighbour attention,
    slide-level transformer, scale fusion, gene encoder, prediction head) is trained with the
    method's losses (Gene-DML: multi-scale instance, cross-level instance-group and MSE).
    Training shows an epoch bar when ``gd.settings.progress`` is on.

    Parameters
    ----------
    sdata
        One SpatialData per slide (a list), or one slide.
    %(slide_keys)s
    %(layer)s
    %(genes)s
    gene_flavor
        How a number of ``genes`` is chosen on the training slides: ``"variance"`` (the most variable
        detected genes, the default) or ``"mean"`` (the most highly expressed ones); see
        :func:`~genedml_sd.pp.select_genes`. Ignored for a list of genes.
    %(encoder)s
    %(method)s
    %(training)s
    %(extraction)s
    extraction_device
        Device for the frozen encoder (default: CUDA when available).
    %(feature_mode)s
    features_key
        Train on tile embeddings already in each slide instead of running ``encoder``: the name of a
        table written by sopa's ``compute_embeddings`` or LazySlide's ``feature_extraction`` (a table
        annotating a shapes element of tiles, one embedding per tile), mapped to the observations by
        position (see :func:`~genedml_sd.tl.table_features`). Every slide needs that table, from the
        same model. The model records the table's model name and tile settings, and
        :func:`~genedml_sd.tl.predict` reads the same kind of table on new slides.
    slide_standardise
        Standardise each slide's features by that slide's own mean and sd (per feature dimension) before
        the model sees them, in training and again in :func:`~genedml_sd.tl.predict` on new slides: removes
        slide-wide shifts of the features such as stain or scanner differences between patients and labs
        (see ``slide_standardise`` of :class:`~genedml_sd.tl.FeatureSpec`).
    tta
        ``"d4"``: every tile feature is the mean over the tile's 8 rotations / flips (8x encoder time).
    stain_norm
        Stain normalisation of every tile, a :class:`~genedml_sd.encoders.StainNormalizer` fitted on a
        reference tile you choose (:func:`~genedml_sd.encoders.fit_stain_normalizer`, Macenko or
        Reinhard). Both are part of the encoder's fingerprint (so of the feature cache key), are
        recorded on the model, and are applied again by :func:`~genedml_sd.tl.predict`.
    **config_overrides
        Fields of the method's config to override, e.g. ``k=25, lam=0.5`` for Gene-DML.

    Returns
    -------
    The trained model (:class:`~genedml_sd.tl.TrainedModel`).
    """
    from genedml_sd.model import TrainArgs, get_method, train_method

    spec = get_method(method)
    if not isinstance(slide_standardise, bool):
        raise TypeError(f"slide_standardise must be True or False, got {slide_standardise!r}.")
    slides = as_list(sdata)
    geometry = geometry or TileGeometry()
    keys = [resolve_slide_keys(s, image_key, shapes_key, table_key, need_table=True) for s in slides]
    infos = [slide_info(s, k) for s, k in zip(slides, keys, strict=True)]
    names = [str(i["section"]) for i in infos]
    val_idx = _split_validation(infos, val_sections, seed)  # before any encoding: a bad value fails at once
    tables = [s.tables[k.table_key] for s, k in zip(slides, keys, strict=True)]

    if isinstance(genes, int | np.integer) and not isinstance(genes, bool):
        gene_list = select_genes(
            tables,
            int(genes),
            layer=layer,
            table_keys=[str(k.table_key) for k in keys],
            slides=names,
            flavor=gene_flavor,
        )
    else:
        if isinstance(genes, str | bool):
            raise TypeError(f"genes must be a number or a list of gene names, got {genes!r}.")
        gene_list = [str(g) for g in genes]
        if len(set(gene_list)) != len(gene_list):
            raise ValueError("genes contains duplicates.")

    enc: FrozenEncoder | None = None
    if features_key is None:
        enc, ref = resolve_encoder(
            encoder, pretrained=pretrained, weights=weights, hf_token=hf_token, tta=tta, stain_norm=stain_norm
        )
    else:
        if tta is not None or stain_norm is not None:
            raise ValueError("tta= and stain_norm= transform tiles for an encoder; features_key= reads embeddings.")
        table_spec = _table_spec(slides, names, features_key, encoder, feature_mode, geometry)
        ref = table_spec.encoder
    cfg = _build_config(spec.config, config, config_overrides, enc_dim=ref.embed_dim, n_genes=len(gene_list))
    neighbours = uses_neighbour_tiles(cfg)
    if features_key is None:
        feature_mode, mode_calls = choose_feature_mode(
            feature_mode,
            [(s, k.image_key, k.shapes_key) for s, k in zip(slides, keys, strict=True)],
            geometry,
            neighbours=neighbours,
        )
        features = FeatureSpec(ref, geometry, feature_mode, neighbours=neighbours, slide_standardise=slide_standardise)
    else:
        features = dataclasses.replace(table_spec, neighbours=neighbours, slide_standardise=slide_standardise)
        mode_calls = {"table": 0}
    extraction = {"device": extraction_device, "num_workers": num_workers, "cache_dir": cache_dir}
    tensors = slide_tensors(
        slides, keys, features, enc, genes=gene_list, names=names, layer=layer, extraction=extraction
    )

    train = [t for i, t in enumerate(tensors) if i not in val_idx]
    val = [tensors[i] for i in val_idx] or None
    logger.info("Training %s on %s, validating on %s", method, [t.name for t in train], [t.name for t in val or []])

    args = TrainArgs(
        max_epochs=max_epochs,
        batch_size=batch_size,
        mix_slides=mix_slides,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        progress=bool(settings.progress),
        resume=resume,
        trainer_kwargs=trainer_kwargs,
    )
    result = train_method(spec, train, val, cfg, args)
    seconds = result.seconds
    module = result.module.cpu().eval()
    cfg = result.config
    ranking, scores = _gene_ranking(module, val or train, gene_list)
    training = {
        "sections": names,
        "patients": sorted({str(i["patient"]) for i in infos}),
        "validation_sections": [names[i] for i in val_idx],
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "seconds": seconds,
        "seed": seed,
        "mix_slides": bool(mix_slides),
        "accelerator": accelerator,
        "gene_ranking": ranking,
        "gene_ranking_pcc": scores,
        "gene_ranking_source": "validation sections" if val else "training sections (in-sample)",
        "layer": layer,
        "gene_flavor": gene_flavor if isinstance(genes, int | np.integer) else "list",
        "feature_mode_calls": mode_calls,
        "selection": dict(result.selection),
    }
    return TrainedModel(
        module=module,
        config=cfg,
        genes=gene_list,
        features=features,
        normalization={"target_sum": TARGET_SUM, "log1p": True},
        history=list(result.history),
        training=training,
        method=spec.name,
    )


def _table_spec(
    slides: Sequence[SpatialData],
    names: Sequence[str],
    features_key: str,
    encoder: Any,
    feature_mode: str,
    geometry: TileGeometry,
) -> FeatureSpec:
    """The feature spec of ``fit(features_key=...)``; the encoder arguments must be left at their defaults."""
    if not (isinstance(encoder, str) and encoder == DEFAULT_ENCODER):
        raise ValueError("Pass either encoder= (features computed here) or features_key= (a table of embeddings).")
    if feature_mode not in ("auto", TABLE_MODE):
        raise ValueError(
            f"features_key= reads features from a table: feature_mode must be 'auto', got {feature_mode!r}."
        )
    return FeatureSpec.from_table(list(zip(slides, names, strict=True)), features_key, geometry, neighbours=True)


RANKING_ROWS = 100 * 1024
"""Most observations per slide the gene ranking is computed on (a seeded random sample beyond that)."""


def _ranking_predictions(module: Any, slide: Any, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Rows and predictions (float32) of the observations of one slide the gene ranking uses.

    All of them up to :data:`RANKING_ROWS`; on larger slides (10^6 bins) a seeded random sample of
    that many, predicted with the whole slide as context, so ranking costs no more than 10^5 rows.
    """
    n = int(slide.n_spots)
    if n <= RANKING_ROWS:
        return np.arange(n), module.predict_slide(slide.local, slide.coords, slide.neighbour).float().cpu().numpy()
    sample = np.sort(np.random.default_rng(0).choice(n, RANKING_ROWS, replace=False))
    order = np.concatenate([sample, np.setdiff1d(np.arange(n), sample)])
    rows, preds = [], []
    chunks = module.iter_predictions(slide.local, slide.coords, slide.neighbour, batch_size=batch, order=order)
    for r, p in chunks:  # batches follow `order`: the sample comes first (RANKING_ROWS is a multiple of batch)
        rows.append(r)
        preds.append(p.float().cpu().numpy())
        if sum(len(x) for x in rows) >= RANKING_ROWS:
            break
    chunks.close()
    return np.concatenate(rows), np.concatenate(preds)


def uses_neighbour_tiles(config: Any) -> bool:
    """Whether a method config reads the 5x5 neighbour-tile features (its ``use_neighbour`` field, default no)."""
    return bool(getattr(config, "use_neighbour", False))


def _build_config(config_cls: Any, config: Any, overrides: dict[str, Any], *, enc_dim: int, n_genes: int) -> Any:
    """The method's config from a preset name / dict / config object, with overrides and data sizes."""
    sizes = {"enc_dim": int(enc_dim), "n_genes": int(n_genes)}
    if isinstance(config, str):
        if hasattr(config_cls, "preset"):
            cfg = config_cls.preset(config, **sizes)
        elif config in ("default", "full"):
            cfg = config_cls(**sizes)
        else:
            raise KeyError(f"{config_cls.__name__} has no presets; pass config='default', a dict or a config.")
    elif isinstance(config, dict):
        cfg = config_cls.from_dict({**config, **sizes})
    elif isinstance(config, config_cls):
        cfg = config_cls.from_dict({**config.to_dict(), **sizes})
    else:
        raise TypeError(
            f"config must be a preset name, a dict or a {config_cls.__name__}, got {type(config).__name__}."
        )
    if overrides:
        unknown = sorted(set(overrides) - set(cfg.to_dict()))
        if unknown:
            raise TypeError(f"Unknown fit() arguments / {config_cls.__name__} fields: {unknown}.")
        cfg = config_cls.from_dict({**cfg.to_dict(), **overrides})
    return cfg


def _gene_ranking(module: Any, slides: Sequence[Any], genes: list[str]) -> tuple[list[str], dict[str, float | None]]:
    """Genes ranked by PCC on training data only (validation slides if any, else the training slides), with the PCCs.

    This is what the leak-free PCC(H) of :func:`genedml_sd.tl.evaluate` uses to pick its top genes,
    so no test data enters the choice.
    """
    import torch

    from genedml_sd.tl._metrics import per_gene_pearson

    pcc = []
    with torch.inference_mode():
        for s in slides:
            rows, pred = _ranking_predictions(module, s)
            pcc.append(per_gene_pearson(pred, s.expr[rows].numpy(), genes)["pcc"].to_numpy())
    with warnings.catch_warnings():  # a gene constant on every ranking slide has no PCC: ranked last
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.vstack(pcc), axis=0) if pcc else np.zeros(len(genes))
    order = np.argsort(-np.nan_to_num(mean, nan=-np.inf), kind="stable")
    scores = {genes[i]: (None if np.isnan(mean[i]) else float(mean[i])) for i in order}
    return [genes[i] for i in order], scores
