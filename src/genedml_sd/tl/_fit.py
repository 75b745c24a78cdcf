"""``gd.tl.fit``: train Gene-DML on one or more SpatialData slides."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd.pp import TARGET_SUM, select_genes
from genedml_sd.tiling import TileGeometry

from ._data import as_list, resolve_slide_keys, slide_expression, slide_info, slides_features
from ._model import EncoderRef, GeneDML

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder

logger = logging.getLogger(__name__)


def resolve_encoder(
    encoder: str | FrozenEncoder,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    hf_token: str | None = None,
) -> tuple[FrozenEncoder, EncoderRef]:
    """Load an encoder by name (or accept a loaded one) and return it with its reference."""
    from genedml_sd.encoders import load_encoder

    if isinstance(encoder, str):
        loaded = load_encoder(encoder, pretrained=pretrained, weights=weights, hf_token=hf_token)
    else:
        loaded = encoder
    return loaded, EncoderRef.of(loaded, pretrained=pretrained, weights=None if weights is None else str(weights))


def _split_validation(infos: list[dict], val_sections: int | Sequence[str] | None, seed: int) -> list[int]:
    """Indices of training slides held out for validation (never from the test data)."""
    n = len(infos)
    if val_sections is None or val_sections == 0:
        return []
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


def fit(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    genes: int | Sequence[str] = 250,
    encoder: str | FrozenEncoder = "uni",
    method: str = "gene-dml",
    pretrained: bool = True,
    weights: str | None = None,
    hf_token: str | None = None,
    geometry: TileGeometry | None = None,
    config: str | dict | Any = "full",
    max_epochs: int = 100,
    batch_size: int = 256,
    val_sections: int | Sequence[str] | None = "auto",
    patience: int = 10,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    extraction_device: str | None = None,
    feature_mode: str = "spot",
    checkpoint_dir: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> GeneDML:
    """Train a Gene-DML model on slides with H&E, spots and a counts table.

    Frozen-encoder features of every spot (local tile and 5x5 neighbour grid) are computed once and
    cached; then the trainable model (per-scale projections, neighbour attention, slide-level
    transformer, scale fusion, gene encoder, prediction head) is trained with the multi-scale
    instance, cross-level instance-group and MSE losses.

    Parameters
    ----------
    sdata
        One SpatialData per slide (a list), or one slide.
    image_key, shapes_key, table_key
        Elements to use in each slide; inferred when unambiguous (an error lists the candidates).
    genes
        Number of highly variable genes to select on the training slides (genes detected in
        >= 10 % of spots, ranked by variance of log-normalised expression), or an explicit list.
    encoder
        Frozen encoder name (see :func:`genedml_sd.encoders.list_encoders`; ``"uni"`` is the paper's,
        ``"stain-texture"`` works offline) or a loaded :class:`~genedml_sd.encoders.FrozenEncoder`.
    method
        ``"gene-dml"`` (default), the second seed system ``"nh2st"``, or a baseline on the same
        features: ``"ridge"`` (PCA-256 + ridge), ``"mlp"`` (ST-Net-like head), ``"bleep"``
        (contrastive retrieval). See :data:`genedml_sd.model.METHODS`.
    pretrained
        ``False`` uses a random-init encoder (for tests and speed benchmarks only).
    weights
        Local weights file for the encoder.
    hf_token
        Hugging Face token for gated encoders (else ``HF_TOKEN``).
    geometry
        Tile geometry; default 112 µm / 224 px tiles and a 5x5 neighbour grid.
    config
        Model configuration. For Gene-DML: a preset name (``"full"``, ``"no-multiscale"``, ``"no-group"``,
        ``"contrastive-only"``, ``"no-instance"``, ``"mse-only"``: the paper's ablations), a dict, or a
        :class:`~genedml_sd.model.GeneDMLConfig`. For other methods: ``"default"``, a dict or their config.
    max_epochs
        Maximum training epochs.
    batch_size
        Spots per training batch (256 in the paper).
    val_sections
        Training slides held out for early stopping and model selection: ``"auto"`` holds out one
        slide when there are at least three, an int holds out that many (chosen with ``seed``), a
        list names them, ``None`` or ``0`` trains without validation (fixed ``max_epochs``).
    patience
        Early-stopping patience in epochs (on validation PCC).
    seed
        Seed for the split, the weights and the batches.
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer` (``devices=2, strategy="ddp"`` for two GPUs;
        ``precision=None`` picks bf16 mixed precision on GPUs that support it, fp32 otherwise).
    cache_dir
        Feature cache location (default ``gd.settings.cache_dir / "features"``).
    num_workers
        Tile-decoding worker processes for feature extraction.
    extraction_device
        Device for the frozen encoder (default: CUDA when available).
    feature_mode
        ``"spot"`` encodes every spot's 5x5 neighbour grid (the paper's, 25 encoder calls per spot);
        ``"lattice"`` encodes a 112 µm lattice over the tissue once and gathers each spot's neighbour
        tokens from it (about 5 calls per spot on a 200 µm lattice; tokens shifted by at most 79 µm).
        Predictions use the same mode.
    checkpoint_dir
        Where Lightning writes checkpoints (best validation PCC) when validating.
    trainer_kwargs
        Further :class:`lightning.pytorch.Trainer` arguments, e.g. ``{"num_nodes": 2}`` for a
        multi-node SLURM job (see the installation page). Under ``torchrun`` or ``srun`` each process
        encodes a share of the slides (:func:`~genedml_sd.encoders.extract_features_sharded`).
    **config_overrides
        Fields of :class:`~genedml_sd.model.GeneDMLConfig` to override, e.g. ``k=25, lam=0.5``.

    Returns
    -------
    The trained model.
    """
    from genedml_sd.model import SlideTensors
    from genedml_sd.model._methods import get_method

    config_cls, _, train_fn = get_method(method)

    slides = as_list(sdata)
    geometry = geometry or TileGeometry()
    keys = [resolve_slide_keys(s, image_key, shapes_key, table_key, need_table=True) for s in slides]
    infos = [slide_info(s, k) for s, k in zip(slides, keys, strict=True)]
    tables = [s.tables[k.table_key] for s, k in zip(slides, keys, strict=True)]

    if isinstance(genes, int | np.integer):
        gene_list = select_genes(tables, int(genes))
    else:
        gene_list = [str(g) for g in genes]
        if len(set(gene_list)) != len(gene_list):
            raise ValueError("genes contains duplicates.")
    exprs = [slide_expression(s, k, gene_list) for s, k in zip(slides, keys, strict=True)]

    enc, ref = resolve_encoder(encoder, pretrained=pretrained, weights=weights, hf_token=hf_token)
    cfg = _build_config(config_cls, config, config_overrides, enc_dim=ref.embed_dim, n_genes=len(gene_list))
    if feature_mode not in ("spot", "lattice"):
        raise ValueError(f"feature_mode must be 'spot' or 'lattice', got {feature_mode!r}.")
    extraction = {"device": extraction_device, "num_workers": num_workers, "cache_dir": cache_dir, "mode": feature_mode}
    feats = slides_features(slides, keys, enc, geometry, neighbours=cfg.use_neighbour, extraction=extraction)
    tensors = [
        SlideTensors.from_numpy(
            local=f.local,
            neighbour=f.neighbour if cfg.use_neighbour else None,
            coords=f.coords_um,
            expr=e,
            name=str(i["section"]),
        )
        for f, e, i in zip(feats, exprs, infos, strict=True)
    ]

    if val_sections == "auto":
        val_sections = 1 if len(slides) >= 3 else None
    val_idx = _split_validation(infos, val_sections, seed)
    train = [t for i, t in enumerate(tensors) if i not in val_idx]
    val = [tensors[i] for i in val_idx] or None
    logger.info("Training on %s, validating on %s", [t.name for t in train], [t.name for t in val or []])

    t0 = time.perf_counter()
    lit = train_fn(
        train,
        val,
        cfg,
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        trainer_kwargs=trainer_kwargs,
    )
    seconds = time.perf_counter() - t0
    module = lit.model.cpu().eval()
    cfg = getattr(lit, "config", cfg)
    ranking = _gene_ranking(module, val or train, gene_list)
    ranking_source = "validation sections" if val else "training sections (in-sample)"
    training = {
        "sections": [str(i["section"]) for i in infos],
        "patients": sorted({str(i["patient"]) for i in infos}),
        "validation_sections": [str(infos[i]["section"]) for i in val_idx],
        "epochs": len(lit.history),
        "seconds": seconds,
        "seed": seed,
        "accelerator": accelerator,
        "gene_ranking": ranking,
        "feature_mode": feature_mode,
        "gene_ranking_source": ranking_source,
    }
    return GeneDML(
        module=module,
        config=cfg,
        genes=gene_list,
        encoder=ref,
        geometry=geometry,
        normalization={"target_sum": TARGET_SUM, "log1p": True},
        history=list(lit.history),
        training=training,
        method=method,
    )


def _build_config(config_cls: type, config: Any, overrides: dict[str, Any], *, enc_dim: int, n_genes: int):
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


def _gene_ranking(module: Any, slides: Sequence[Any], genes: list[str]) -> list[str]:
    """Genes ranked by PCC on training data only (validation slides if any, else the training slides).

    This is what the leak-free PCC(H) of :func:`genedml_sd.tl.evaluate` uses to pick its top genes,
    so no test data enters the choice.
    """
    import torch

    from genedml_sd.tl._metrics import per_gene_pearson

    pcc = []
    with torch.inference_mode():
        for s in slides:
            pred = module.predict_slide(s.local, s.coords, s.neighbour).float().cpu().numpy()
            pcc.append(per_gene_pearson(pred, s.expr.numpy(), genes)["pcc"].to_numpy())
    with warnings.catch_warnings():  # a gene constant on every ranking slide has no PCC: ranked last
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.vstack(pcc), axis=0) if pcc else np.zeros(len(genes))
    order = np.argsort(-np.nan_to_num(mean, nan=-np.inf), kind="stable")
    return [genes[i] for i in order]
