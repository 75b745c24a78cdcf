"""``gd.pl.gene_scores``: per-gene scores of one evaluation, or cross-validation results of several methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from ._training import _axes_list, _finish, _new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_LABELS = {
    "pcc": "Pearson r",
    "pcc_a": "PCC(A)",
    "pcc_h": "PCC(H)",
    "pcc_h_leak_free": "PCC(H) leak-free",
    "mse": "MSE",
    "mae": "MAE",
}
_LOWER_IS_BETTER = {"mse", "mae"}
_CV_METRICS = {"pcc": ["pcc_a", "pcc_h_leak_free"], "pcc_a": ["pcc_a"], "pcc_h": ["pcc_h"]}
_CV_METRICS.update({"pcc_h_leak_free": ["pcc_h_leak_free"], "mse": ["mse"], "mae": ["mae"]})


def gene_scores(
    results: Any,
    *,
    metric: str = "pcc",
    top: int = 10,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    color: str = "C0",
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Per-gene scores of one evaluation, or per-fold cross-validation scores of one or more methods.

    With an :class:`~genedml_sd.tl.Evaluation` (or its ``per_gene`` table) two panels are drawn:
    the distribution of the per-gene metric over the genes (histogram, and one tick per gene)
    with PCC(A), the mean over non-constant genes, marked (and PCC(H), the mean of the best 50, for
    ``metric="pcc"``), and a bar chart of the ``top`` best genes.

    With cross-validation results (the DataFrame of :func:`genedml_sd.tl.cross_validate`, or a dict
    ``{method name: DataFrame}``) one panel is drawn: one dot per fold (left-out group) and the mean
    ± sd over folds as a bar with error bars, per method; for ``metric="pcc"`` both PCC(A) and, when
    present, the leak-free PCC(H). When folds hold several test slides, the per-slide scores
    (``df.attrs["per_slide"]``) are added as small open circles.

    Parameters
    ----------
    results
        An :class:`~genedml_sd.tl.Evaluation` from :func:`genedml_sd.tl.evaluate`, a per-gene
        DataFrame (index gene, column ``metric``), a DataFrame from
        :func:`genedml_sd.tl.cross_validate`, or a dict of such DataFrames keyed by method name.
    metric
        For an evaluation: a per-gene column, ``"pcc"`` (Pearson r, dimensionless), ``"mse"`` or
        ``"mae"`` (squared / absolute error of log-normalised expression). For cross-validation:
        ``"pcc"`` (PCC(A) and leak-free PCC(H)), ``"pcc_a"``, ``"pcc_h"``, ``"pcc_h_leak_free"``,
        ``"mse"`` or ``"mae"``.
    top
        Number of best genes in the bar chart (lowest error for ``"mse"``/``"mae"``); 0 to skip it.
    ax
        Axes to draw into: for an evaluation one or two (distribution, top genes; with one, the
        bar chart is skipped), for cross-validation one. By default a new figure is made.
    figsize
        Figure size (width, height) in inches, when a new figure is made.
    color
        Matplotlib colour of the per-gene distribution and bars.
    save
        Write the figure to this path (format from the extension, e.g. ``.png``, ``.pdf``).
    show
        Call :func:`matplotlib.pyplot.show` after drawing; by default the figure is only returned.

    Returns
    -------
    The figure.

    Examples
    --------
    >>> ev = gd.tl.evaluate(b4, pred_key="gd_predictions")  # doctest: +SKIP
    >>> fig = gd.pl.gene_scores(ev, top=15)  # doctest: +SKIP
    >>> cv = {
    ...     "gene-dml": gd.tl.cross_validate(slides),
    ...     "ridge": gd.tl.cross_validate(slides, method="ridge"),
    ... }  # doctest: +SKIP
    >>> fig = gd.pl.gene_scores(cv)  # doctest: +SKIP
    """
    if isinstance(results, Mapping):
        if not results:
            raise ValueError("gene_scores got an empty dict of results.")
        bad = {k: type(v).__name__ for k, v in results.items() if not _is_cv_frame(v)}
        if bad:
            raise TypeError(f"A dict of results must map method names to gd.tl.cross_validate DataFrames; got {bad}.")
        return _cv_scores({str(k): v for k, v in results.items()}, metric, ax, figsize, save, show)
    if _is_cv_frame(results):
        name = str(results.attrs.get("method", "model"))
        return _cv_scores({name: results}, metric, ax, figsize, save, show)
    if hasattr(results, "per_gene") and isinstance(results.per_gene, pd.DataFrame):
        per_gene, summary = results.per_gene, dict(getattr(results, "summary", {}) or {})
    elif isinstance(results, pd.DataFrame):
        per_gene, summary = results, {}
    else:
        raise TypeError(
            "gene_scores needs an Evaluation (gd.tl.evaluate), a per-gene DataFrame, a gd.tl.cross_validate "
            f"DataFrame or a dict of those; got {type(results).__name__}."
        )
    return _evaluation_scores(per_gene, summary, metric, top, ax, figsize, color, save, show)


def _is_cv_frame(obj: Any) -> bool:
    return isinstance(obj, pd.DataFrame) and "fold" in obj.columns


# --------------------------------------------------------------------------------------------- one evaluation
def _evaluation_scores(
    per_gene: pd.DataFrame,
    summary: dict[str, Any],
    metric: str,
    top: int,
    ax: Any,
    figsize: tuple[float, float] | None,
    color: str,
    save: str | Path | None,
    show: bool | None,
) -> Figure:
    if metric not in per_gene.columns:
        numeric = [c for c in per_gene.columns if pd.api.types.is_float_dtype(per_gene[c])]
        raise KeyError(f"metric={metric!r} is not a per-gene column; choose one of {numeric}.")
    constant = per_gene["constant"].to_numpy(bool) if "constant" in per_gene.columns else np.zeros(len(per_gene), bool)
    values = per_gene.loc[~constant, metric].astype(np.float64)
    values = values[np.isfinite(values)]
    if values.empty:
        raise ValueError(f"No finite per-gene {metric!r} values to plot (all genes constant or undefined).")
    label = _LABELS.get(metric, metric)
    lower_better = metric in _LOWER_IS_BETTER

    axes = _axes_list(ax)
    n_panels = 2 if top > 0 else 1
    if axes is None:
        if figsize is None:
            figsize = (9.5, max(3.6, 0.28 * min(top, len(values)) + 1.2))
        axes = _new_figure(n_panels, figsize, (4.75, 3.6))
    fig = cast("Figure", axes[0].figure)

    # distribution: histogram over genes with a rug of one tick per gene
    dist = axes[0]
    v = values.to_numpy()
    bins = min(30, max(5, len(v) // 3))
    counts = np.asarray(dist.hist(v, bins=bins, color=color, alpha=0.6, edgecolor="white")[0])
    dist.plot(v, np.full(len(v), -0.04 * counts.max()), "|", color=color, ms=8, alpha=0.8)
    dist.set_ylim(-0.08 * counts.max(), None)
    dist.set_ylabel("genes")
    dist.set_xlabel(f"per-gene {label}")
    mean = float(summary.get("pcc_a", v.mean())) if metric == "pcc" else float(v.mean())
    mean_label = f"PCC(A) = {mean:.3f}" if metric == "pcc" else f"mean = {mean:.3g}"
    dist.axvline(mean, color="k", lw=1.5, label=mean_label)
    if metric == "pcc" and np.isfinite(summary.get("pcc_h", np.nan)):
        n_top = min(int(summary.get("n_top", 50)), len(v))
        dist.axvline(summary["pcc_h"], color="k", ls="--", lw=1, label=f"PCC(H) top {n_top} = {summary['pcc_h']:.3f}")
    if metric == "pcc":
        dist.axvline(0, color="0.6", lw=0.8, ls=":")
    dist.legend(fontsize="small", loc="upper left")
    n_const = int(constant.sum())
    note = f", {n_const} constant excluded" if n_const else ""
    dist.set_title(f"{label} over {len(v)} genes{note}", fontsize="medium")

    # top genes
    if top > 0 and len(axes) > 1:
        bars = axes[1]
        best = values.sort_values(ascending=lower_better).head(top)
        y = np.arange(len(best))[::-1]
        bars.barh(y, best.to_numpy(), color=color, alpha=0.8)
        bars.set_yticks(y, [str(g) for g in best.index], fontsize="small")
        for yi, val in zip(y, best.to_numpy(), strict=True):
            bars.text(val, yi, f" {val:.2f}", va="center", ha="left" if val >= 0 else "right", fontsize="x-small")
        bars.set_xlabel(label)
        lo, hi = min(0.0, float(best.min())), float(best.max())
        bars.set_xlim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.18 * (hi - lo + 1e-9))
        bars.set_title(f"Top {len(best)} genes by {label}", fontsize="medium")
    return _finish(fig, save, show)


# --------------------------------------------------------------------------------------------- cross-validation
def _fold_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["fold"].astype(str).isin(["mean", "sd"])]


def _cv_scores(
    frames: dict[str, pd.DataFrame],
    metric: str,
    ax: Any,
    figsize: tuple[float, float] | None,
    save: str | Path | None,
    show: bool | None,
) -> Figure:
    if metric not in _CV_METRICS:
        raise KeyError(f"metric={metric!r} is not a cross-validation metric; choose one of {sorted(_CV_METRICS)}.")
    wanted = _CV_METRICS[metric]
    columns = [c for c in wanted if any(c in df.columns and _fold_rows(df)[c].notna().any() for df in frames.values())]
    if not columns:
        raise KeyError(f"None of the cross-validation results has a column among {wanted}.")

    axes = _axes_list(ax)
    if axes is None:
        if figsize is None:
            figsize = (max(4.0, 1.2 + 1.3 * len(frames) * len(columns)), 3.8)
        axes = _new_figure(1, figsize, (5.0, 3.8))
    axis = axes[0]
    fig = cast("Figure", axis.figure)
    width = 0.8 / len(columns)
    rng = np.random.default_rng(0)
    slides_shown = False
    for j, col in enumerate(columns):
        offsets = np.arange(len(frames)) + (j - (len(columns) - 1) / 2) * width
        for x, (_, df) in zip(offsets, frames.items(), strict=True):
            folds = _fold_rows(df)
            if col not in folds.columns:
                continue
            vals = folds[col].astype(np.float64).to_numpy()
            finite = np.isfinite(vals)
            if not finite.any():
                continue
            mean, sd = _mean_sd(df, col, vals[finite])
            axis.bar(
                x,
                mean,
                width=width * 0.9,
                color=f"C{j}",
                alpha=0.35,
                yerr=sd if np.isfinite(sd) else None,
                capsize=4,
                label=_LABELS[col] if x == offsets[0] else None,
            )
            jitter = rng.uniform(-0.18, 0.18, finite.sum()) * width
            labels = folds["test_group"].astype(str).to_numpy()[finite] if "test_group" in folds else None
            axis.scatter(x + jitter, vals[finite], color=f"C{j}", edgecolor="k", lw=0.5, s=22, zorder=3)
            per_slide = pd.DataFrame(df.attrs.get("per_slide") or [])
            if col in per_slide.columns and len(per_slide) > len(folds):
                # folds with several test slides: also show each slide, as small open circles
                sv = per_slide[col].astype(np.float64).to_numpy()
                sv = sv[np.isfinite(sv)]
                sj = rng.uniform(-0.3, 0.3, len(sv)) * width
                axis.scatter(x + sj, sv, facecolor="none", edgecolor=f"C{j}", lw=0.8, s=10, zorder=2)
                slides_shown = True
            if labels is not None and len(labels) <= 8:
                for xi, yi, g in zip(x + jitter, vals[finite], labels, strict=True):
                    axis.annotate(g, (xi, yi), xytext=(3, 0), textcoords="offset points", fontsize="xx-small")
    axis.set_xticks(np.arange(len(frames)), list(frames))
    axis.set_xlim(-0.6, len(frames) - 0.4)
    if metric in _LOWER_IS_BETTER:
        axis.set_ylabel(f"{_LABELS[metric]} (log-normalised expression)")
    else:
        axis.set_ylabel("Pearson r")
        axis.axhline(0, color="0.6", lw=0.8, ls=":")
    n_folds = max(len(_fold_rows(df)) for df in frames.values())
    slides = ", open circles: test slides" if slides_shown else ""
    axis.set_title(f"Cross-validation: {n_folds} folds (dots{slides}), mean ± sd", fontsize="medium")
    axis.legend(fontsize="small", loc="best")
    return _finish(fig, save, show)


def _mean_sd(df: pd.DataFrame, col: str, vals: np.ndarray) -> tuple[float, float]:
    """Mean and sd over folds: the ``mean``/``sd`` rows of the frame if present, else computed."""
    key = df["fold"].astype(str)
    if (key == "mean").any() and (key == "sd").any():
        mean = float(df.loc[key == "mean", col].iloc[0])
        sd = float(df.loc[key == "sd", col].iloc[0])
        if np.isfinite(mean):
            return mean, sd
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
