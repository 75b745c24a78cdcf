"""``gd.pl.predicted_vs_observed``: observed and predicted expression side by side on the H&E."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import ATTRS_KEY, image_levels, resolve_key, shared_coordinate_system

from ._training import _finish

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_OBSERVED, _PREDICTED = "observed", "predicted"
_UNITS = "log-normalised expression\n(log1p counts per 10k)"


def predicted_vs_observed(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    pred_key: str = "gd_predictions",
    table_key: str | None = None,
    image_key: str | None = None,
    layer: str | None = None,
    coordinate_system: str | None = None,
    ncols: int = 1,
    cmap: str = "viridis",
    percentiles: tuple[float, float] = (1.0, 99.0),
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Observed and predicted expression of genes side by side on the H&E image.

    For each gene, two panels show the spots coloured by observed expression (the counts table
    annotating the same spots, log-normalised as in training: library size scaled to 10,000 counts,
    then ``log1p``) and by predicted expression, over the H&E image, rendered with spatialdata-plot.
    Both panels share one colour scale (the ``percentiles`` of the observed and predicted values
    together) with one colorbar; the predicted panel's title gives the gene's Pearson r between
    predicted and observed expression over the spots (as :func:`genedml_sd.tl.per_gene_pearson`).

    ``sdata`` is not modified: the panels are drawn from a shallow SpatialData holding the image,
    the spots and two temporary tables.

    Parameters
    ----------
    sdata
        SpatialData holding the prediction table (from :func:`genedml_sd.tl.predict`), the H&E image
        and a counts table annotating the same spots.
    genes
        A gene name or a list of them; each must be among the prediction table's ``var_names``.
    pred_key
        Name of the prediction table.
    table_key
        Name of the counts table; inferred as the one table annotating the same spots that is not a
        prediction table.
    image_key
        Name of the H&E image; by default the one recorded in the prediction table, else the only image.
    layer
        Layer of the counts table holding raw counts (default ``X``).
    coordinate_system
        Coordinate system to draw in; by default ``"global"`` when the image and the spots share it, else
        the first shared one (an error lists the shared systems when the given one is not).
    ncols
        Genes per figure row (each gene takes two panels and a colorbar).
    cmap
        Matplotlib colormap of the spots.
    percentiles
        Lower and upper percentiles (in %, 0-100) of the observed and predicted values of a gene that
        set its colour range; values outside are clipped to the end colours.
    figsize
        Figure size (width, height) in inches; by default about 4 in per panel, from the image aspect.
    dpi
        Resolution of the saved file in dots per inch; by default the figure's (100).
    save
        Write the figure to this path (format from the extension, e.g. ``.png``, ``.pdf``).
    show
        Call :func:`matplotlib.pyplot.show` after drawing; by default the figure is only returned.

    Returns
    -------
    The figure: per gene an observed and a predicted panel (in that order in ``fig.axes``), then
    the colorbars (Axes labelled ``"<colorbar>"``).

    Raises
    ------
    KeyError
        If ``pred_key`` is not a table (the message lists the tables), if a gene is not predicted
        by that table, or if no counts table can be found.

    Examples
    --------
    >>> gd.tl.predict(b4, model, key_added="gd_predictions")  # doctest: +SKIP
    >>> fig = gd.pl.predicted_vs_observed(b4, ["ERBB2", "GNAS"], save="b4.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the sdata.pl accessor)
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ValueError("Pass at least one gene to plot.")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}.")
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")

    data = _panel_data(sdata, genes, pred_key, table_key, image_key, layer=layer, coordinate_system=coordinate_system)
    n = len(genes)
    nrows = math.ceil(n / ncols)
    ncols = min(ncols, n)
    if figsize is None:
        panel_w = 4.0
        panel_h = panel_w * data["aspect"] + 0.5
        figsize = (ncols * (2 * panel_w + 1.0), nrows * panel_h + 0.4)
    fig, axes = plt.subplots(nrows, 2 * ncols, figsize=figsize, squeeze=False, layout="constrained")
    try:
        cmap_obj = plt.get_cmap(cmap)
        plot_sdata = data["sdata"]
        cs = data["coordinate_system"]
        for i, gene in enumerate(genes):
            row, col = divmod(i, ncols)
            pair = [axes[row, 2 * col], axes[row, 2 * col + 1]]
            values = np.concatenate([data["observed"][:, i], data["predicted"][:, i]])
            values = values[np.isfinite(values)]
            vmin, vmax = np.percentile(values, [lo_pct, hi_pct]) if values.size else (0.0, 1.0)
            if not vmax > vmin:
                vmin, vmax = vmin - 0.5, vmax + 0.5
            norm = Normalize(vmin=float(vmin), vmax=float(vmax))
            r = data["pcc"][i]
            pcc_text = f"PCC = {r:.3f}" if np.isfinite(r) else "PCC n/a (constant)"
            titles = (f"{gene} {_OBSERVED}", f"{gene} {_PREDICTED}\n{pcc_text}")
            for axis, table_name, title in zip(pair, (_OBSERVED, _PREDICTED), titles, strict=True):
                with warnings.catch_warnings():
                    # spatialdata-plot's own use of a matplotlib API slated for deprecation; nothing for users to do
                    warnings.filterwarnings("ignore", category=PendingDeprecationWarning, module=r"spatialdata_plot\.")
                    (
                        plot_sdata.pl.render_images(data["image_key"])
                        .pl.render_shapes(
                            data["shapes_key"],
                            color=gene,
                            table_name=table_name,
                            cmap=cmap_obj,
                            norm=norm,
                            colorbar=False,
                        )
                        .pl.show(ax=axis, coordinate_systems=cs, title=title, show=False)
                    )
                axis.set_title(title, fontsize="medium")
                axis.set_xlabel("")
                axis.set_ylabel("")
                axis.set_xticks([])
                axis.set_yticks([])
            mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap_obj)
            fig.colorbar(mappable, ax=pair, shrink=0.8, label=_UNITS)
        for extra in range(n, nrows * ncols):
            row, col = divmod(extra, ncols)
            axes[row, 2 * col].remove()
            axes[row, 2 * col + 1].remove()
    except BaseException:
        plt.close(fig)  # do not leave a half-drawn figure open in pyplot
        raise
    fig.suptitle(data["suptitle"], fontsize="large")
    return _finish(fig, save, show, dpi=dpi)


def _panel_data(
    sdata: SpatialData,
    genes: list[str],
    pred_key: str,
    table_key: str | None,
    image_key: str | None,
    *,
    layer: str | None = None,
    coordinate_system: str | None = None,
) -> dict[str, Any]:
    """Observed and predicted values (spots in shapes order) and a shallow SpatialData to render them."""
    import spatialdata
    from anndata import AnnData
    from spatialdata.models import TableModel

    from genedml_sd.tl import observed_and_predicted, per_gene_pearson

    pred_key = resolve_key(sdata, "tables", pred_key, what="pred_key")
    paired = observed_and_predicted(sdata, pred_key=pred_key, table_key=table_key, genes=genes, layer=layer)
    shapes_key, observed, predicted = paired.shapes_key, paired.observed, paired.predicted
    info = sdata.tables[pred_key].uns.get(ATTRS_KEY, {})
    if image_key is None and info.get("image_key") in sdata.images:
        image_key = info["image_key"]
    image_key = resolve_key(sdata, "images", image_key)
    shapes = sdata.shapes[shapes_key]
    pcc = per_gene_pearson(predicted, observed, genes)["pcc"].to_numpy()

    # two temporary tables keyed like the spots (same instance-id dtype as the shapes index)
    import pandas as pd

    obs_df = pd.DataFrame(
        {"region": pd.Categorical([shapes_key] * len(shapes)), "spot_id": shapes.index.to_numpy()},
        index=pd.Index([str(i) for i in shapes.index]),
    )
    var = pd.DataFrame(index=pd.Index(genes))
    tables = {
        name: TableModel.parse(
            AnnData(X=values.astype(np.float32), obs=obs_df.copy(), var=var.copy()),
            region=shapes_key,
            region_key="region",
            instance_key="spot_id",
        )
        for name, values in ((_OBSERVED, observed), (_PREDICTED, predicted))
    }
    plot_sdata = spatialdata.SpatialData(
        images={image_key: sdata.images[image_key]}, shapes={shapes_key: shapes}, tables=tables
    )
    level0 = image_levels(sdata.images[image_key])[0]
    aspect = level0.sizes["y"] / level0.sizes["x"]
    section = info.get("section", shapes_key)
    method = info.get("method")
    suptitle = f"{section}: observed vs predicted" + (f" ({method})" if method else "")
    return {
        "sdata": plot_sdata,
        "image_key": image_key,
        "shapes_key": shapes_key,
        "coordinate_system": shared_coordinate_system(
            sdata, shapes_key, image_key, coordinate_system=coordinate_system
        ),
        "observed": observed,
        "predicted": predicted,
        "pcc": pcc,
        "aspect": float(aspect),
        "suptitle": suptitle,
    }
