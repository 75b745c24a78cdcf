"""``gd.tl.cross_validate``: leave-one-group-out evaluation without test-set leakage."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genedml_sd._docs import docs

from ._data import as_list, resolve_slide_keys, slide_expression, slide_info
from ._ensemble import check_ensemble, ensemble_predictions, fit_ensemble, mean_reliability, observation_uncertainty
from ._evaluate import N_TOP, score_predictions
from ._features import FeatureSpec, choose_feature_mode
from ._fit import _build_config, fit, resolve_encoder, uses_neighbour_tiles
from ._reference import neighbour_reference

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder, StainNormalizer
    from genedml_sd.tiling import TileGeometry

logger = logging.getLogger(__name__)

METRICS = ["pcc_a", "pcc_h", "pcc_h_leak_free", "mse", "mae", "reliability_rho"]


def leave_one_group_out(groups: Sequence[str]) -> list[tuple[str, list[int], list[int]]]:
    """Folds ``(test_group, train_indices, test_indices)``, one per distinct group, in sorted order."""
    groups = [str(g) for g in groups]
    out = []
    for g in sorted(set(groups)):
        test = [i for i, x in enumerate(groups) if x == g]
        train = [i for i, x in enumerate(groups) if x != g]
        out.append((g, train, test))
    return out


@docs
def cross_validate(
    sdatas: Sequence[SpatialData],
    *,
    groups: str | Sequence[str] = "patient",
    method: str = "gene-dml",
    config: str | dict | Any = "full",
    encoder: str | FrozenEncoder = "uni",
    pretrained: bool = True,
    weights: str | None = None,
    hf_token: str | None = None,
    geometry: TileGeometry | None = None,
    genes: int | Sequence[str] = 250,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    val_sections: int | str | Sequence[str] | None = "auto",
    n_top: int = N_TOP,
    seed: int = 0,
    max_epochs: int = 100,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    feature_mode: str = "auto",
    features_key: str | None = None,
    tta: str | None = None,
    stain_norm: StainNormalizer | None = None,
    keep_predictions: bool = False,
    n_models: int = 1,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-group-out cross-validation (by default: leave one patient out).

    For each fold, genes are selected, normalisation statistics computed, the validation section
    for early stopping drawn and the gene ranking of the leak-free PCC(H) made on the *training*
    groups only; the held-out group is used for nothing but scoring. Frozen-encoder features are
    extracted once per slide (disk cache) and shared by every fold and every method.

    Parameters
    ----------
    sdatas
        Slides with image, spots and counts table.
    groups
        ``"patient"`` or ``"section"`` (from each slide's sample metadata) or one label per slide.
    %(method)s
    %(encoder)s
    genes
        Genes per fold: a number (selected on that fold's training slides) or a fixed list.
    %(slide_keys)s
    %(layer)s
    val_sections
        Validation hold-out within the training groups (see :func:`genedml_sd.tl.fit`).
    n_top
        Genes of PCC(H).
    seed, max_epochs
        Training seed and length.
    %(extraction)s
    %(feature_mode)s
    features_key
        Read every slide's features from this table of tile embeddings (sopa / LazySlide) instead of
        running ``encoder`` (see :func:`~genedml_sd.tl.fit`).
    tta, stain_norm
        Tile transforms of the encoder (see :func:`~genedml_sd.tl.fit`).
    keep_predictions
        Keep every test slide's predicted and observed log-normalised expression in
        ``df.attrs["predictions"]`` (what :func:`~genedml_sd.tl.compare_methods` bootstraps over
        spots). Off by default: it holds n_spots x n_genes x 8 bytes per test slide (two float32
        arrays), e.g. 8 MB for 4000 spots and 250 genes.
    n_models
        Train a seed ensemble of this many members per fold (:func:`~genedml_sd.tl.fit_ensemble`, seeds
        ``seed, seed + 1, ...``) and score the members' mean prediction; adds ``uncertainty_rho`` per fold,
        the Spearman correlation over test spots between the ensemble's spread and each spot's error.
    **fit_kwargs
        Further :func:`genedml_sd.tl.fit` arguments (``batch_size``, ``accelerator``, config fields...).

    Returns
    -------
    One row per fold (``fold``, ``test_group``, ``test_sections``, ``train_sections``,
    ``validation_sections``, ``n_test_spots``, the metrics ``pcc_a``, ``pcc_h``, ``pcc_h_leak_free``,
    ``mse``, ``mae``, ``reliability_rho`` averaged over the fold's test slides, ``neighbour_pcc_a`` (the
    ceiling reference on the same slides and genes: each spot predicted by the mean measured
    expression of its adjacent spots, :func:`~genedml_sd.tl.neighbour_reference`, information no image
    model has), ``uncertainty_rho`` (ensembles only), ``n_constant``, ``epochs`` (epochs
    trained, i.e. where early stopping stopped), ``best_epoch`` (epoch whose weights were kept; NaN
    without validation sections), ``selected`` (the predictor chosen on the validation sections with
    Gene-DML's ``predictor="auto"``, else empty), ``val_pcc_a`` (mean per-gene PCC of the trained model
    on the fold's validation sections, training data only: the score to compare settings by without
    looking at the test patient; NaN without validation sections), ``train_seconds``, ``predict_seconds``), then a ``mean`` and an
    ``sd`` row over folds (``epochs`` and ``best_epoch`` are NaN there; for an ensemble both are its first
    member's, and ``train_seconds`` sums the members). ``df.attrs`` holds the
    per-slide results (``"per_slide"``), the per-gene test PCCs (``"per_gene"``: a DataFrame with
    one row per fold, test section and gene, columns ``fold``, ``test_group``, ``section``,
    ``gene``, ``pcc`` (NaN where undefined), ``constant`` (observed expression constant on that
    slide)), with ``keep_predictions`` the arrays (``"predictions"``: section -> dict with
    ``fold``, ``genes``, ``predicted`` and ``observed`` float32 (n_spots, n_genes)),
    feature-extraction seconds per slide (``"feature_seconds"``), and the run settings.
    """
    slides = as_list(sdatas)
    keys = [resolve_slide_keys(s, image_key, shapes_key, table_key, need_table=True) for s in slides]
    infos = [slide_info(s, k) for s, k in zip(slides, keys, strict=True)]
    names = [str(i["section"]) for i in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"Slide section names must be unique for cross-validation, got {names}.")
    if isinstance(groups, str):
        if groups not in ("patient", "section"):
            raise ValueError(f"groups must be 'patient', 'section' or one label per slide, got {groups!r}.")
        labels = [str(i[groups]) for i in infos]
    else:
        labels = [str(g) for g in groups]
        if len(labels) != len(slides):
            raise ValueError(f"groups has {len(labels)} labels for {len(slides)} slides.")
    folds = leave_one_group_out(labels)
    if len(folds) < 2:
        raise ValueError(f"Cross-validation needs at least two groups, got {sorted(set(labels))}.")

    from genedml_sd.tiling import TileGeometry

    geometry = geometry or TileGeometry()
    extraction: dict[str, Any] = {"cache_dir": cache_dir, "num_workers": num_workers}
    feature_seconds: dict[str, float] = {}
    enc: FrozenEncoder | None = None
    if features_key is not None:  # embeddings from sopa / LazySlide tables: nothing to encode
        spec = FeatureSpec.from_table(list(zip(slides, names, strict=True)), features_key, geometry, neighbours=True)
        fit_features: dict[str, Any] = {"features_key": features_key}
        feature_mode = spec.mode
    else:
        enc, ref = resolve_encoder(
            encoder, pretrained=pretrained, weights=weights, hf_token=hf_token, tta=tta, stain_norm=stain_norm
        )
        # every fold reads these cached features; neighbour grids only for methods that use them
        neighbours = _needs_neighbours(method, config, fit_kwargs, enc_dim=ref.embed_dim, genes=genes)
        # "auto" is resolved once, from all slides' spot layouts (no expression is read), so every fold uses one mode
        feature_mode, _ = choose_feature_mode(
            feature_mode,
            [(s, k.image_key, k.shapes_key) for s, k in zip(slides, keys, strict=True)],
            geometry,
            neighbours=neighbours,
        )
        spec = FeatureSpec(ref, geometry, feature_mode, neighbours=neighbours)
        fit_features = {"encoder": enc, "pretrained": pretrained, "weights": weights, "feature_mode": feature_mode}
        _encode_once(spec, enc, slides, keys, names, extraction, feature_seconds)

    if isinstance(n_models, bool) or not isinstance(n_models, int | np.integer) or n_models < 1:
        raise ValueError(f"n_models must be an integer >= 1, got {n_models!r}.")
    metrics = [*METRICS, "neighbour_pcc_a"] + (["uncertainty_rho"] if n_models > 1 else [])
    rows, per_slide, per_gene = [], [], []
    predictions: dict[str, dict[str, Any]] = _ByIdentity()
    for fold, (group, train_idx, test_idx) in enumerate(folds):
        logger.info("Fold %d: test %s = %s", fold, group, [names[i] for i in test_idx])
        train_fn: Any = fit if n_models == 1 else partial(fit_ensemble, n_models=int(n_models))
        trained = train_fn(
            [slides[i] for i in train_idx],
            image_key=image_key,
            shapes_key=shapes_key,
            table_key=table_key,
            layer=layer,
            genes=genes,
            geometry=geometry,
            method=method,
            config=config,
            val_sections=val_sections,
            seed=seed,
            max_epochs=max_epochs,
            cache_dir=cache_dir,
            num_workers=num_workers,
            **fit_features,
            **fit_kwargs,
        )
        members = check_ensemble(trained)
        model = members[0]
        reliability = mean_reliability(members) if n_models > 1 else model.training.get("gene_ranking_pcc")
        ranking = list(reliability or {}) if n_models > 1 else model.training["gene_ranking"]
        t0 = time.perf_counter()
        fold_scores = []
        for i in test_idx:
            s, k = slides[i], keys[i]
            feats = model.features.extract(s, enc, image_key=k.image_key, shapes_key=k.shapes_key, **extraction)
            pred, spread = ensemble_predictions(members, feats)
            obs = slide_expression(s, k, model.genes, layer=layer)
            ev = score_predictions(
                pred,
                obs,
                model.genes,
                reference_ranking=ranking,
                n_top=n_top,
                reliability=reliability,
                uncertainty=None if spread is None else observation_uncertainty(spread),
            )
            ceiling, _ = neighbour_reference(
                s, model.genes, shapes_key=k.shapes_key, table_key=k.table_key, layer=layer, image_key=k.image_key
            )
            ev.summary["neighbour_pcc_a"] = score_predictions(ceiling, obs, model.genes).summary["pcc_a"]
            fold_scores.append(ev.summary)
            per_slide.append({"fold": fold, "test_group": group, "section": names[i], **_plain(ev.summary)})
            per_gene.append(_gene_rows(ev.per_gene, fold, group, names[i]))
            if keep_predictions:
                predictions[names[i]] = {
                    "fold": fold,
                    "genes": list(model.genes),
                    "predicted": np.asarray(pred, dtype=np.float32),
                    "observed": np.asarray(obs, dtype=np.float32),
                }
        predict_seconds = time.perf_counter() - t0
        rows.append(
            {
                "fold": fold,
                "test_group": group,
                "test_sections": ",".join(names[i] for i in test_idx),
                "train_sections": ",".join(model.training["sections"]),
                "validation_sections": ",".join(model.training["validation_sections"]),
                "n_test_spots": int(sum(s["n_spots"] for s in fold_scores)),
                **{m: float(np.nanmean([s[m] for s in fold_scores])) for m in metrics},
                "n_constant": int(sum(s["n_constant"] for s in fold_scores)),
                "epochs": model.training["epochs"],
                "best_epoch": _epoch_or_nan(model.training.get("best_epoch")),
                "selected": str(model.training.get("selection", {}).get("predictor", "")),
                "val_pcc_a": _validation_pcc(model.training),
                "train_seconds": float(sum(m.training["seconds"] for m in members)),
                "predict_seconds": predict_seconds,
            }
        )
    df = pd.DataFrame(rows)
    numeric = [*metrics, "val_pcc_a", "train_seconds", "predict_seconds"]
    summary = pd.DataFrame(
        [
            {"fold": "mean", "test_group": "all", **df[numeric].mean().to_dict()},
            {"fold": "sd", "test_group": "all", **df[numeric].std(ddof=1).to_dict()},
        ]
    )
    out = pd.concat([df.astype({"fold": object}), summary], ignore_index=True)
    if keep_predictions:
        out.attrs["predictions"] = predictions
    out.attrs.update(
        {
            "per_slide": per_slide,
            "per_gene": _AttrsFrame(pd.concat(per_gene, ignore_index=True)),
            "feature_seconds": feature_seconds,
            "method": method,
            "config": config if isinstance(config, str | dict) else config.to_dict(),
            "encoder": spec.encoder.name,
            "encoder_fingerprint": spec.encoder.fingerprint,
            "groups": groups if isinstance(groups, str) else labels,
            "seed": seed,
            "n_models": int(n_models),
            "feature_mode": feature_mode,
        }
    )
    return out


class _AttrsFrame(pd.DataFrame):
    """A DataFrame kept in a result's ``attrs``: equal only to itself as a whole.

    ``pd.concat`` of two results compares their ``attrs``; a plain DataFrame there would make that
    comparison raise. Column-wise operations are unchanged and return plain DataFrames.
    """

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __deepcopy__(self, memo: Any = None) -> _AttrsFrame:  # pandas deep-copies attrs after each operation
        return _AttrsFrame(self.copy(deep=True))

    __hash__ = None  # type: ignore[assignment]


class _ByIdentity(dict):
    """A dict of arrays kept in a result's ``attrs``: equal only to itself (see :class:`_AttrsFrame`)."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = None


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "leak_free_genes"}


def _gene_rows(per_gene: pd.DataFrame, fold: int, group: str, section: str) -> pd.DataFrame:
    """Tidy per-gene rows of one test slide (from :attr:`Evaluation.per_gene`) for ``attrs["per_gene"]``."""
    return pd.DataFrame(
        {
            "fold": np.full(len(per_gene), fold, dtype=np.int64),
            "test_group": group,
            "section": section,
            "gene": per_gene.index.astype(str),
            "pcc": per_gene["pcc"].to_numpy(dtype=np.float64),
            "constant": per_gene["constant"].to_numpy(dtype=bool),
        }
    )


def _validation_pcc(training: dict[str, Any]) -> float:
    """Mean per-gene PCC on the validation sections from a training record (NaN without validation sections)."""
    if training.get("gene_ranking_source") != "validation sections":
        return float("nan")
    values = [v for v in training.get("gene_ranking_pcc", {}).values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _epoch_or_nan(epoch: Any) -> float:
    """A best epoch as a number for the fold table (NaN when no epoch was selected on validation data)."""
    return float("nan") if epoch is None else float(epoch)


def _encode_once(
    spec: FeatureSpec,
    enc: FrozenEncoder,
    slides: Sequence[SpatialData],
    keys: Sequence[Any],
    names: Sequence[str],
    extraction: dict[str, Any],
    seconds: dict[str, float],
) -> None:
    """Extract (and cache) every slide's features once, before the folds; seconds per slide into ``seconds``."""
    from genedml_sd.encoders import process_rank

    if process_rank()[1] > 1:  # torchrun / srun: every process encodes a share of the slides
        t0 = time.perf_counter()
        spec.extract_many(
            [(s, k.image_key, k.shapes_key) for s, k in zip(slides, keys, strict=True)], enc, **extraction
        )
        seconds["all (sharded)"] = time.perf_counter() - t0
    for s, k, name in zip(slides, keys, names, strict=True):
        t0 = time.perf_counter()
        spec.extract(s, enc, image_key=k.image_key, shapes_key=k.shapes_key, **extraction)
        seconds[name] = time.perf_counter() - t0


def _needs_neighbours(method: str, config: Any, fit_kwargs: dict[str, Any], *, enc_dim: int, genes: Any) -> bool:
    """Whether ``method`` with ``config`` reads neighbour features (when in doubt, ``True``: fit reports errors)."""
    import inspect

    from genedml_sd.model import get_method

    fit_params = set(inspect.signature(fit).parameters)
    overrides = {k: v for k, v in fit_kwargs.items() if k not in fit_params}
    try:
        n_genes = int(genes) if isinstance(genes, int | np.integer) else len(genes)
        cfg = _build_config(get_method(method).config, config, overrides, enc_dim=enc_dim, n_genes=max(n_genes, 1))
    except Exception:  # noqa: BLE001 - fit raises the real error with its context
        return True
    return uses_neighbour_tiles(cfg)
