"""``gd.tl.evaluate``: per-gene and summary metrics of a prediction table against observed counts."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from genedml_sd._spatial import ATTRS_KEY, aligned_tables
from genedml_sd.pp import TARGET_SUM, normalized_expression

from ._ensemble import UNCERTAINTY_KEY
from ._metrics import per_gene_pearson

if TYPE_CHECKING:
    from spatialdata import SpatialData

N_TOP = 50


@dataclass
class Evaluation:
    """Result of :func:`~genedml_sd.tl.evaluate`.

    Attributes
    ----------
    per_gene
        One row per gene: ``pcc``, ``pvalue`` (two-sided, t-test of r), ``mse``, ``mae``,
        ``n_spots``, ``constant`` (observed expression constant over the spots: PCC undefined, the
        gene is excluded from the PCC summaries and counted).
    summary
        ``pcc_a`` (mean PCC over non-constant genes), ``pcc_h`` (the paper's: mean of the 50 highest
        test PCCs), ``pcc_h_leak_free`` (mean test PCC of the 50 genes ranked highest on *training*
        data), ``mse``, ``mae`` (over all spots and genes), ``n_genes``, ``n_constant``, ``n_spots``.
    """

    per_gene: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Evaluation({s.get('n_genes')} genes x {s.get('n_spots')} spots: PCC(A)={s.get('pcc_a', np.nan):.3f}, "
            f"PCC(H)={s.get('pcc_h', np.nan):.3f}, PCC(H) leak-free={s.get('pcc_h_leak_free', np.nan):.3f}, "
            f"MSE={s.get('mse', np.nan):.3f}, MAE={s.get('mae', np.nan):.3f})"
        )


def pearson_pvalues(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-values of Pearson correlations ``r`` over ``n`` samples (Student t, n - 2 dof)."""
    from scipy import stats

    r = np.asarray(r, dtype=np.float64)
    if n < 3:
        return np.full_like(r, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt((n - 2) / np.clip(1 - r**2, 1e-300, None))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return np.where(np.isnan(r), np.nan, p)


def score_predictions(
    pred: np.ndarray,
    obs: np.ndarray,
    genes: Sequence[str],
    *,
    reference_ranking: Sequence[str] | None = None,
    n_top: int = N_TOP,
    reliability: Mapping[str, float | None] | None = None,
    uncertainty: np.ndarray | None = None,
) -> Evaluation:
    """Metrics of predicted vs observed log-normalised expression of one slide.

    Parameters
    ----------
    pred, obs
        (n_spots, n_genes) predicted and observed expression.
    genes
        Gene names, n_genes.
    reference_ranking
        Genes ranked on training data only (best first); its first ``n_top`` genes that are not
        constant on this slide define the leak-free PCC(H).
    n_top
        Number of genes of PCC(H).
    reliability
        A per-gene reliability estimate made without this slide (the model's
        ``training["gene_ranking_pcc"]``, the PCC of each gene on the validation sections); adds
        ``reliability_rho`` to the summary, the Spearman correlation over genes between it and the
        test PCC (how well the estimate ranks the genes this slide shows to be well predicted).
    uncertainty
        A per-observation uncertainty (n_spots,), e.g. an ensemble's ``obs["uncertainty"]``; adds
        ``uncertainty_rho`` to the summary, the Spearman correlation over observations between it and
        each observation's mean squared error over genes (positive: larger where predictions are worse).
    """
    genes = list(genes)
    per_gene = per_gene_pearson(pred, obs, genes)
    per_gene.insert(1, "pvalue", pearson_pvalues(per_gene["pcc"].to_numpy(), obs.shape[0]))
    valid = per_gene.loc[~per_gene["constant"] & per_gene["pcc"].notna(), "pcc"]
    summary: dict[str, Any] = {
        "pcc_a": float(valid.mean()) if len(valid) else np.nan,
        "pcc_h": float(valid.sort_values(ascending=False).head(n_top).mean()) if len(valid) else np.nan,
        "pcc_h_leak_free": np.nan,
        "mse": float(np.mean((np.asarray(pred, np.float64) - obs) ** 2)),
        "mae": float(np.mean(np.abs(np.asarray(pred, np.float64) - obs))),
        "n_genes": len(genes),
        "n_constant": int(per_gene["constant"].sum()),
        "n_spots": int(obs.shape[0]),
        "n_top": int(n_top),
    }
    if reference_ranking is not None:
        top = [g for g in reference_ranking if g in valid.index][:n_top]
        summary["pcc_h_leak_free"] = float(valid.loc[top].mean()) if top else np.nan
        summary["leak_free_genes"] = top
    if reliability is not None:
        summary["reliability_rho"] = reliability_spearman(reliability, valid)
    if uncertainty is not None:
        from ._ensemble import uncertainty_spearman

        summary["uncertainty_rho"] = uncertainty_spearman(uncertainty, pred, obs)
    return Evaluation(per_gene, summary)


def reliability_spearman(reliability: Mapping[str, float | None], test_pcc: pd.Series) -> float:
    """Spearman correlation over genes between a reliability estimate and the test PCC (NaN below 3 genes).

    Genes without an estimate (``None`` / NaN) or without a test PCC are left out.
    """
    from scipy.stats import spearmanr

    est = pd.Series({g: np.nan if v is None else float(v) for g, v in reliability.items()}, dtype=float)
    both = pd.concat([est.rename("est"), test_pcc.astype(float).rename("test")], axis=1, join="inner").dropna()
    if len(both) < 3 or both["est"].nunique() < 2 or both["test"].nunique() < 2:
        return float("nan")
    return float(spearmanr(both["est"], both["test"]).statistic)


@dataclass(frozen=True)
class PairedExpression:
    """Observed and predicted log-normalised expression of the same observations, row by row.

    Attributes
    ----------
    observed, predicted
        (n_obs, n_genes) float64, observations in the order of the shapes element.
    genes
        Gene names, n_genes.
    shapes_key, pred_key, table_key
        The observations element, the prediction table and the counts table.
    uncertainty
        The prediction table's per-observation ``obs["uncertainty"]`` (n_obs,) in the same row order, when
        it has one (an ensemble's prediction), else ``None``.
    """

    observed: np.ndarray
    predicted: np.ndarray
    genes: list[str]
    shapes_key: str
    pred_key: str
    table_key: str
    uncertainty: np.ndarray | None = None


def observed_and_predicted(
    sdata: SpatialData,
    *,
    pred_key: str = "gd_predictions",
    table_key: str | None = None,
    genes: Sequence[str] | Literal["shared"] | None = None,
    layer: str | None = None,
) -> PairedExpression:
    """Align a prediction table with the observed counts of the same spots, log-normalised as in training.

    Parameters
    ----------
    sdata
        SpatialData holding the prediction table and a counts table annotating the same spots.
    pred_key
        Name of the prediction table (from :func:`genedml_sd.tl.predict`).
    table_key
        Name of the counts table; inferred as the one counts table annotating the same spots.
    genes
        Genes to return: default every predicted gene (each must be measured); ``"shared"`` the
        predicted genes the counts table measures, in the prediction table's order (a warning when
        fewer than half are); or a list, each predicted and measured.
    layer
        Layer of the counts table holding raw counts (default ``X``).

    Returns
    -------
    Observed and predicted (n_obs, n_genes) arrays in shapes order, with the names of the elements used.

    Raises
    ------
    KeyError
        A gene asked for is not predicted, or (without ``genes="shared"``) not measured.
    ValueError
        ``genes="shared"`` and the tables have no gene in common.
    """
    aligned = aligned_tables(sdata, pred_key, table_key)
    pred_table = sdata.tables[pred_key]
    info = pred_table.uns.get(ATTRS_KEY, {})
    if float(info.get("normalization", {}).get("target_sum", TARGET_SUM)) != TARGET_SUM:
        raise ValueError(f"Prediction table {pred_key!r} was made with another normalisation target sum.")
    obs_table = sdata.tables[aligned.table_key]
    if isinstance(genes, str) and genes == "shared":
        genes = _shared_genes(pred_table, obs_table, pred_key, aligned.table_key)
    elif isinstance(genes, str):
        raise ValueError(f"genes must be None, 'shared' or a list of gene names, got {genes!r}.")
    genes = list(pred_table.var_names) if genes is None else [str(g) for g in genes]
    missing = [g for g in genes if g not in pred_table.var_names]
    if missing:
        raise KeyError(
            f"Genes {missing} are not among the var_names of prediction table {pred_key!r} "
            f"({pred_table.n_vars} genes, e.g. {list(pred_table.var_names[:5])})."
        )
    unmeasured = [g for g in genes if g not in obs_table.var_names]
    if unmeasured:
        raise KeyError(
            f"{len(unmeasured)} of {len(genes)} predicted genes are not measured in table {aligned.table_key!r} "
            f"(e.g. {unmeasured[:10]}); pass genes='shared' to score the {int(pred_table.var_names.isin(obs_table.var_names).sum())} "
            "genes both tables have."
        )
    observed = normalized_expression(
        obs_table[aligned.obs_rows], genes, table_key=aligned.table_key, layer=layer, slide=aligned.shapes_key
    )
    x = pred_table[aligned.pred_rows, genes].X
    predicted = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    uncertainty = None
    if UNCERTAINTY_KEY in pred_table.obs:
        uncertainty = pred_table.obs[UNCERTAINTY_KEY].to_numpy(dtype=np.float64)[aligned.pred_rows]
    return PairedExpression(
        np.asarray(observed, dtype=np.float64),
        predicted,
        genes,
        aligned.shapes_key,
        pred_key,
        aligned.table_key,
        uncertainty,
    )


def _shared_genes(pred_table: Any, obs_table: Any, pred_key: str, table_key: str) -> list[str]:
    shared = pred_table.var_names[pred_table.var_names.isin(obs_table.var_names)]
    if len(shared) == 0:
        raise ValueError(
            f"Prediction table {pred_key!r} ({pred_table.n_vars} genes, e.g. {list(pred_table.var_names[:5])}) and "
            f"counts table {table_key!r} (e.g. {list(obs_table.var_names[:5])}) have no gene in common."
        )
    if len(shared) < 0.5 * pred_table.n_vars:
        warnings.warn(
            f"Scoring {len(shared)} of the {pred_table.n_vars} predicted genes of {pred_key!r}: the others are not "
            f"measured in {table_key!r}. Summaries over so few genes are not comparable with full-panel scores.",
            UserWarning,
            stacklevel=4,
        )
    return list(shared)


def evaluate(
    sdata: SpatialData,
    *,
    pred_key: str = "gd_predictions",
    table_key: str | None = None,
    genes: Sequence[str] | Literal["shared"] | None = None,
    layer: str | None = None,
    reference_ranking: Sequence[str] | None = None,
    n_top: int = N_TOP,
    inplace: bool = True,
) -> Evaluation:
    """Compare a prediction table with the observed counts of the same spots.

    Observed counts are log-normalised as in training (library size to ``target_sum``, ``log1p``).

    Parameters
    ----------
    sdata
        SpatialData holding the prediction table (from :func:`genedml_sd.tl.predict`) and a counts
        table annotating the same spots.
    pred_key
        Name of the prediction table.
    table_key
        Name of the counts table; inferred as the one table annotating the same spots that is not a
        prediction table.
    genes
        Genes to score: default every predicted gene (each must be measured, else a ``KeyError``
        suggesting ``"shared"``); ``"shared"`` the predicted genes the counts table measures (e.g. a
        model trained on another panel), with a warning when that is fewer than half; or a list.
    layer
        Layer of the counts table holding raw counts (default ``X``).
    reference_ranking
        Genes ranked on training data (best first) for the leak-free PCC(H); by default the ranking
        the model stored when it was trained (PCC on its validation sections), found in the
        prediction table's ``uns``.
    n_top
        Number of genes of PCC(H) (50 in the paper).
    inplace
        Store the per-gene table and the summary in ``sdata.tables[pred_key].uns["genedml_sd"]["evaluation"]``.

    Returns
    -------
    The per-gene metrics and the summary (see :class:`Evaluation`); when the prediction table has
    ``var["reliability_pcc"]``, the summary's ``reliability_rho`` is the Spearman correlation over genes
    between that estimate and the PCC measured here; when it has ``obs["uncertainty"]`` (an ensemble's),
    ``uncertainty_rho`` is the Spearman correlation over observations between the uncertainty and each
    observation's mean squared error over genes.
    """
    paired = observed_and_predicted(sdata, pred_key=pred_key, table_key=table_key, genes=genes, layer=layer)
    table_key, genes, obs, pred = paired.table_key, paired.genes, paired.observed, paired.predicted
    pred_table = sdata.tables[pred_key]
    info = pred_table.uns.get(ATTRS_KEY, {})
    if reference_ranking is None:
        reference_ranking = info.get("gene_ranking")
    reliability = None
    if "reliability_pcc" in pred_table.var:  # the model's per-gene estimate, made without this slide
        reliability = pred_table.var["reliability_pcc"].to_dict()
    result = score_predictions(
        pred,
        obs,
        genes,
        reference_ranking=reference_ranking,
        n_top=n_top,
        reliability=reliability,
        uncertainty=paired.uncertainty,
    )
    result.summary["table_key"] = table_key
    if inplace:
        store = dict(pred_table.uns.get(ATTRS_KEY, {}))
        store["evaluation"] = {
            "summary": {k: v for k, v in result.summary.items() if k != "leak_free_genes"},
            "per_gene": result.per_gene.reset_index(),
        }
        pred_table.uns[ATTRS_KEY] = store
    return result
