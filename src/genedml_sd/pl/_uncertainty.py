"""``gd.pl.uncertainty``: an ensemble's per-observation uncertainty on the H&E, next to the error when known."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import ATTRS_KEY, image_levels, resolve_key, shared_coordinate_system

from ._training import _finish

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_PANELS = {"uncertainty": "uncertainty (ensemble sd)", "error": "error (MSE over genes)"}


def uncertainty(
    sdata: SpatialData,
    *,
    pred_key: str = "gd_predictions",
    table_key: str | None = None,
    image_key: str | None = None,
    layer: str | None = None,
    with_error: bool | None = None,
    coordinate_system: str | None = None,
    cmap: str = "magma",
    percentiles: tuple[float, float] = (1.0, 99.0),
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """The per-observation uncertainty of an ensemble's prediction on the H&E image.

    The first panel colours every observation by ``obs["uncertainty"]`` of the prediction table (the mean
    over genes of the ensemble members' standard deviation, written by :func:`~genedml_sd.tl.predict` for
    a list of models). When the slide also has a counts table for the same observations, a second panel
    shows each observation's prediction error (mean squared error over the predicted genes, observed counts
    log-normalised as in training), titled with the Spearman rho between the two: uncertainty that tracks
    the error has rho > 0. ``sdata`` is not modified.

    Parameters
    ----------
    sdata
        SpatialData with the prediction table and the H&E image.
    pred_key
        Name of the prediction table.
    table_key
        Counts table for the error panel (inferred as for :func:`~genedml_sd.tl.evaluate`).
    image_key
        H&E image; by default the one recorded in the prediction table.
    layer
        Layer of the counts table holding raw counts (default ``X``).
    with_error
        Draw the error panel: ``None`` when a counts table is found, ``True`` requires one.
    coordinate_system
        Coordinate system to draw in (default ``"global"`` when shared).
    cmap
        Matplotlib colormap of the observations.
    percentiles
        Lower and upper percentiles (0-100) of each panel's colour range.
    figsize
        Figure size in inches (default about 4.5 in per panel).
    save
        Write the figure to this path.
    show
        Call :func:`matplotlib.pyplot.show` after drawing.

    Returns
    -------
    The figure: the uncertainty panel, then the error panel if drawn, then the colorbars.

    Raises
    ------
    KeyError
        The prediction table has no ``obs["uncertainty"]`` (predicted with one model), or
        ``with_error=True`` and no counts table annotates the observations.
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the sdata.pl accessor)
    from matplotlib.colors import Normalize

    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
    data = _uncertainty_data(sdata, pred_key, table_key, image_key, layer, with_error, coordinate_system)
    panels = [p for p in _PANELS if p in data["values"]]
    if figsize is None:
        figsize = (len(panels) * 4.8, 4.5 * data["aspect"] + 0.6)
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False, layout="constrained")
    try:
        for axis, name in zip(axes[0], panels, strict=True):
            values = data["values"][name]
            finite = values[np.isfinite(values)]
            vmin, vmax = np.percentile(finite, [lo, hi]) if finite.size else (0.0, 1.0)
            if not vmax > vmin:
                vmin, vmax = vmin - 0.5, vmax + 0.5
            norm = Normalize(vmin=float(vmin), vmax=float(vmax))
            title = _PANELS[name] + (f"\nSpearman rho with uncertainty = {data['rho']:.2f}" if name == "error" else "")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=PendingDeprecationWarning, module=r"spatialdata_plot\.")
                (
                    data["sdata"]
                    .pl.render_images(data["image_key"])
                    .pl.render_shapes(
                        data["shapes_key"],
                        color=name,
                        table_name="values",
                        cmap=plt.get_cmap(cmap),
                        norm=norm,
                        colorbar=False,
                    )
                    .pl.show(ax=axis, coordinate_systems=data["coordinate_system"], title=title, show=False)
                )
            axis.set_title(title, fontsize="medium")
            axis.set_xlabel("")
            axis.set_ylabel("")
            axis.set_xticks([])
            axis.set_yticks([])
            fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axis, shrink=0.8)
    except BaseException:
        plt.close(fig)
        raise
    fig.suptitle(data["suptitle"], fontsize="large")
    return _finish(fig, save, show)


def _uncertainty_data(
    sdata: SpatialData,
    pred_key: str,
    table_key: str | None,
    image_key: str | None,
    layer: str | None,
    with_error: bool | None,
    coordinate_system: str | None,
) -> dict[str, Any]:
    """Per-observation values in shapes order and a shallow SpatialData to render them."""
    import pandas as pd
    import spatialdata
    from anndata import AnnData
    from spatialdata.models import TableModel

    from genedml_sd._spatial import prediction_region, table_rows_for_shapes
    from genedml_sd.tl import observed_and_predicted
    from genedml_sd.tl._ensemble import UNCERTAINTY_KEY, uncertainty_spearman

    pred_key = resolve_key(sdata, "tables", pred_key, what="pred_key")
    table = sdata.tables[pred_key]
    if UNCERTAINTY_KEY not in table.obs:
        raise KeyError(
            f"Prediction table {pred_key!r} has no obs[{UNCERTAINTY_KEY!r}]: it comes from one model. Predict with "
            "a list of models (gd.tl.fit_ensemble) to get a per-observation uncertainty."
        )
    info = table.uns.get(ATTRS_KEY, {})
    shapes_key = prediction_region(sdata, pred_key)
    shapes = sdata.shapes[shapes_key]
    rows = table_rows_for_shapes(table, shapes, shapes_key, pred_key)
    values: dict[str, np.ndarray] = {"uncertainty": table.obs[UNCERTAINTY_KEY].to_numpy(dtype=np.float64)[rows]}
    rho = float("nan")
    if with_error is not False:
        try:
            paired = observed_and_predicted(sdata, pred_key=pred_key, table_key=table_key, layer=layer)
        except KeyError:
            if with_error:
                raise
        else:
            values["error"] = np.mean((paired.predicted - paired.observed) ** 2, axis=1)
            rho = uncertainty_spearman(values["uncertainty"], paired.predicted, paired.observed)
    if image_key is None and info.get("image_key") in sdata.images:
        image_key = info["image_key"]
    image_key = resolve_key(sdata, "images", image_key)
    obs = pd.DataFrame(
        {"region": pd.Categorical([shapes_key] * len(shapes)), "spot_id": shapes.index.to_numpy(), **values},
        index=pd.Index([str(i) for i in shapes.index]),
    )
    values_table = TableModel.parse(AnnData(obs=obs), region=shapes_key, region_key="region", instance_key="spot_id")
    level0 = image_levels(sdata.images[image_key])[0]
    members = info.get("ensemble", {}).get("n_models")
    return {
        "sdata": spatialdata.SpatialData(
            images={image_key: sdata.images[image_key]}, shapes={shapes_key: shapes}, tables={"values": values_table}
        ),
        "image_key": image_key,
        "shapes_key": shapes_key,
        "coordinate_system": shared_coordinate_system(
            sdata, shapes_key, image_key, coordinate_system=coordinate_system
        ),
        "values": values,
        "rho": rho,
        "aspect": float(level0.sizes["y"] / level0.sizes["x"]),
        "suptitle": f"{info.get('section', shapes_key)}: uncertainty"
        + (f" of a {members}-model ensemble" if members else ""),
    }
