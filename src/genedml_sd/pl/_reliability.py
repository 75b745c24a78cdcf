"""How far to trust each predicted gene: the model's reliability estimate against the measured test PCC."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._training import _axes_list, _finish, _new_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def gene_reliability(
    predictions: AnnData,
    evaluation: Any = None,
    *,
    label_top: int = 5,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """The per-gene reliability of a prediction table, against the test PCC when it is known.

    Without ``evaluation``: the genes' ``var["reliability_pcc"]`` (each gene's PCC on the model's
    validation sections, made without the predicted slide) sorted from best to worst, the
    ``label_top`` best named. With ``evaluation`` (the :class:`~genedml_sd.tl.Evaluation` of the same
    table against measured counts, or its ``per_gene`` table): a scatter of the estimate (x) against the
    test PCC (y), one dot per gene, with the diagonal and the Spearman rho in the title; genes the
    estimate trusts most should lie high.

    Parameters
    ----------
    predictions
        A table from :func:`genedml_sd.tl.predict` (``sdata.tables["gd_predictions"]``).
    evaluation
        Optional :class:`~genedml_sd.tl.Evaluation` of that table (or a per-gene DataFrame with ``pcc``).
    label_top
        Number of most reliable genes named on the plot.
    ax
        Axes to draw into (default: a new figure).
    figsize
        Figure size of a new figure.
    save
        Save the figure to this path.
    show
        Show the figure (``plt.show()``).

    Returns
    -------
    The figure.

    Raises
    ------
    KeyError
        The table has no ``var["reliability_pcc"]`` (made by a model without a gene ranking).
    """
    from genedml_sd.tl._evaluate import reliability_spearman

    if "reliability_pcc" not in predictions.var:
        raise KeyError(
            "The prediction table has no var['reliability_pcc']; it is written by gd.tl.predict for models "
            "that ranked their genes in training."
        )
    est = predictions.var["reliability_pcc"].astype(float)
    axes = _axes_list(ax) or _new_figure(1, figsize, (5.0, 4.0))
    a = axes[0]
    if evaluation is None:
        order = est.sort_values(ascending=False, na_position="last")
        a.plot(np.arange(len(order)), order.to_numpy(), "o", ms=3, color="C0")
        for i, gene in enumerate(order.index[:label_top]):
            a.annotate(gene, (i, order.iloc[i]), xytext=(4, 0), textcoords="offset points", fontsize=8)
        a.set_xlabel("genes, most reliable first")
        a.set_ylabel("reliability (validation PCC)")
        a.set_title("Per-gene reliability")
    else:
        per_gene = evaluation if isinstance(evaluation, pd.DataFrame) else evaluation.per_gene
        test = per_gene["pcc"].astype(float)
        if "constant" in per_gene:
            test = test[~per_gene["constant"].astype(bool)]
        both = pd.concat([est.rename("est"), test.rename("test")], axis=1, join="inner").dropna()
        a.scatter(both["est"], both["test"], s=10, color="C0")
        lo = float(np.nanmin(both.to_numpy())) if len(both) else 0.0
        hi = float(np.nanmax(both.to_numpy())) if len(both) else 1.0
        a.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        for gene in both.sort_values("est", ascending=False).index[:label_top]:
            a.annotate(
                gene,
                (both.loc[gene, "est"], both.loc[gene, "test"]),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=8,
            )
        rho = reliability_spearman(est.to_dict(), test)
        a.set_xlabel("reliability (validation PCC)")
        a.set_ylabel("test PCC")
        a.set_title(f"Reliability vs test PCC, Spearman rho = {rho:.2f} ({len(both)} genes)")
    fig = a.get_figure()
    assert fig is not None
    return _finish(fig, save, show)  # type: ignore[arg-type]
