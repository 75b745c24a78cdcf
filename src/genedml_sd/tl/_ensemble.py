"""Seed ensembles: several models of one recipe whose spread says how far each prediction can be trusted."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._model import TrainedModel

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import SpotFeatures

logger = logging.getLogger(__name__)

UNCERTAINTY_KEY = "uncertainty"
"""Column of a prediction table's ``obs``: the per-observation uncertainty of an ensemble's prediction."""

SD_LAYER = "sd"
"""Layer of a prediction table: the per-observation, per-gene spread (sd) of an ensemble's members."""


def fit_ensemble(
    sdata: SpatialData | Sequence[SpatialData],
    n_models: int = 5,
    *,
    seed: int = 0,
    **fit_kwargs: Any,
) -> list[TrainedModel]:
    """Train the same recipe ``n_models`` times with seeds ``seed, seed + 1, ...``: a seed ensemble.

    Every member is a :func:`~genedml_sd.tl.fit` call with the same data, genes and features (cached
    features are encoded once and shared); only the seed changes, so the weights, the batch order and
    (with ``val_sections="auto"`` or a number) the validation section each member holds out change too.
    Pass the list to :func:`~genedml_sd.tl.predict`: the prediction is the members' mean, and their
    spread is stored as a per-observation uncertainty.

    Parameters
    ----------
    sdata
        Training slides, as for :func:`~genedml_sd.tl.fit`.
    n_models
        Members, >= 2 (5 is a common choice; training time grows linearly).
    seed
        Seed of the first member.
    **fit_kwargs
        Arguments of :func:`~genedml_sd.tl.fit` (``genes``, ``encoder``, ``method``, ``max_epochs``, ...).
        A fixed gene list is recommended when the members must share genes with another model; a number of
        genes is selected on the same training slides by every member, so they share it anyway.

    Returns
    -------
    The trained members, in seed order.
    """
    from ._fit import fit

    if isinstance(n_models, bool) or not isinstance(n_models, int | np.integer) or n_models < 2:
        raise ValueError(f"n_models must be an integer >= 2 (an ensemble needs two members), got {n_models!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    models = []
    for i in range(int(n_models)):
        logger.info("Ensemble member %d of %d (seed %d)", i + 1, n_models, seed + i)
        models.append(fit(sdata, seed=int(seed) + i, **fit_kwargs))
    return check_ensemble(models)


def check_ensemble(models: TrainedModel | Sequence[TrainedModel]) -> list[TrainedModel]:
    """The members of an ensemble as a list, checked to predict the same genes from the same features.

    A single :class:`~genedml_sd.tl.TrainedModel` is returned as a one-member list.

    Raises
    ------
    TypeError
        If a member is not a :class:`~genedml_sd.tl.TrainedModel`.
    ValueError
        If the list is empty, or members differ in genes (names or order) or in their features (encoder
        fingerprint, tile geometry, feature mode, neighbour tiles): the message names the first member that
        differs and how.
    """
    members = [models] if isinstance(models, TrainedModel) else list(models)
    if not members:
        raise ValueError("An ensemble needs at least one model; got an empty list.")
    for i, m in enumerate(members):
        if not isinstance(m, TrainedModel):
            raise TypeError(f"Ensemble member {i} is a {type(m).__name__}, not a TrainedModel from gd.tl.fit.")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        if list(m.genes) != list(first.genes):
            diff = sorted(set(m.genes) ^ set(first.genes))[:5]
            what = f"genes differ (e.g. {diff})" if diff else "genes are in another order"
            raise ValueError(f"Ensemble member {i} cannot be averaged with member 0: {what}.")
        if m.features.to_dict() != first.features.to_dict():
            raise ValueError(
                f"Ensemble member {i} was trained on other features than member 0 (encoder {m.encoder.name!r} "
                f"{m.encoder.fingerprint[:12]} vs {first.encoder.name!r} {first.encoder.fingerprint[:12]}, "
                f"mode {m.features.mode!r} vs {first.features.mode!r}, tiles {m.geometry.key()} vs "
                f"{first.geometry.key()}); members must share one feature recipe."
            )
    return members


def ensemble_predictions(
    models: Sequence[TrainedModel], features: SpotFeatures, *, device: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The members' mean prediction and their spread, both float32 (n_obs, n_genes).

    The spread is the sample standard deviation over members (ddof 1), computed in one pass (Welford),
    so memory holds three (n_obs, n_genes) float32 arrays whatever the number of members. With one
    member the spread is ``None``.
    """
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for k, model in enumerate(models, start=1):
        pred = model.predict_features(features, device=device)
        if mean is None:
            mean, m2 = pred, np.zeros_like(pred)
            continue
        assert m2 is not None
        delta = pred - mean
        mean += delta / k
        m2 += delta * (pred - mean)
    assert mean is not None and m2 is not None
    if len(models) < 2:
        return mean, None
    return mean, np.sqrt(m2 / (len(models) - 1), dtype=np.float32)


def observation_uncertainty(sd: np.ndarray) -> np.ndarray:
    """Per-observation uncertainty (n_obs,) float32: the mean over genes of the members' spread ``sd``.

    In the units of the predictions (log-normalised expression); larger means the members disagree more.
    """
    return np.asarray(sd, dtype=np.float32).mean(axis=1)


def uncertainty_spearman(uncertainty: np.ndarray, pred: np.ndarray, obs: np.ndarray) -> float:
    """Spearman correlation over observations between the uncertainty and the prediction error.

    The error of an observation is its mean squared error over genes. A positive value means the
    uncertainty is larger where predictions are worse. NaN with fewer than 3 observations or a constant
    uncertainty / error.
    """
    from scipy.stats import spearmanr

    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    err = np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(obs, dtype=np.float64)) ** 2, axis=1)
    if u.shape != err.shape:
        raise ValueError(f"uncertainty has {u.size} values for {err.size} observations.")
    ok = np.isfinite(u) & np.isfinite(err)
    if ok.sum() < 3 or np.ptp(u[ok]) == 0 or np.ptp(err[ok]) == 0:
        return float("nan")
    return float(spearmanr(u[ok], err[ok]).statistic)


def mean_reliability(models: Sequence[TrainedModel]) -> dict[str, float | None]:
    """Per-gene reliability of an ensemble: the mean of its members' validation PCCs (None where none has one).

    Members are usually a little worse than their mean prediction, so this errs on the cautious side.
    """
    genes = list(models[0].genes)
    out: dict[str, float | None] = {}
    for g in genes:
        vals = [m.training.get("gene_ranking_pcc", {}).get(g) for m in models]
        vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
        out[g] = float(np.mean(vals)) if vals else None
    return dict(sorted(out.items(), key=lambda kv: np.inf if kv[1] is None else -kv[1]))  # best first, None last
