"""The end-to-end demo behind ``genedml-sd demo``: fit on patient C, predict patient B."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def run_demo(
    out: str | Path = "genedml_demo",
    *,
    encoder: str = "stain-texture",
    max_epochs: int = 60,
    n_genes: int = 250,
    seed: int = 0,
    overwrite: bool = True,
) -> dict:
    """Fit Gene-DML on the demo's patient-C sections and predict section B4 (an unseen patient).

    Writes ``<out>/B4_predictions.zarr`` (the slide with a ``gd_predictions`` table and a
    ``gd_observed`` table of log-normalised counts) and ``<out>/B4_predicted_vs_observed.png``.

    Returns
    -------
    Summary dict: PCC(A), the top genes with their PCC, timings, output paths.
    """
    import genedml_sd as gd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    b4, c2, c3, c4 = gd.datasets.her2st_demo()
    print(
        f"Loaded the HER2ST demo: train on C2, C3, C4 (patient C), test on B4 (patient B). [{time.perf_counter() - t0:.0f}s]"
    )

    model = gd.tl.fit([c2, c3, c4], genes=n_genes, encoder=encoder, max_epochs=max_epochs, seed=seed)
    print(f"Trained {model} in {model.training['seconds']:.0f}s ({model.training['epochs']} epochs).")
    gd.tl.predict(b4, model, key_added="gd_predictions", overwrite=True)

    from anndata import AnnData
    from spatialdata.models import TableModel

    from genedml_sd.tl._data import resolve_slide_keys, slide_expression

    keys = resolve_slide_keys(b4, None, None, "table", need_table=True)
    observed = slide_expression(b4, keys, model.genes)
    pred_table = b4.tables["gd_predictions"]
    scores = gd.tl.per_gene_pearson(pred_table.X, observed, model.genes)
    valid = scores[~scores["constant"]]
    pcc_a = float(valid["pcc"].mean())
    top = valid["pcc"].sort_values(ascending=False).head(10)

    obs_table = AnnData(X=observed, obs=pred_table.obs.copy(), var=pred_table.var.copy())
    b4.tables["gd_observed"] = TableModel.parse(
        obs_table, region=keys.shapes_key, region_key="region", instance_key="spot_id"
    )
    zarr_path = out / "B4_predictions.zarr"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")
        b4.write(zarr_path, overwrite=overwrite)
    png = out / "B4_predicted_vs_observed.png"
    _plot(b4, list(top.index[:3]), scores, png)

    elapsed = time.perf_counter() - t0
    print(
        f"\nB4 (unseen patient B): PCC(A) = {pcc_a:.3f} over {len(valid)} genes "
        f"({int(scores['constant'].sum())} constant genes excluded)"
    )
    print("Top genes by PCC on B4 (chosen on the test section itself, i.e. the paper's optimistic PCC(H) view):")
    for gene, r in top.items():
        print(f"  {gene:<10s} {r:.3f}")
    print(f"\nWrote {zarr_path} and {png} in {elapsed:.0f}s total.")
    return {"pcc_a": pcc_a, "top": top.to_dict(), "seconds": elapsed, "zarr": str(zarr_path), "png": str(png)}


def _plot(sdata, genes: list[str], scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers sdata.pl)
    from matplotlib.colors import Normalize

    fig, axes = plt.subplots(len(genes), 2, figsize=(11, 4.6 * len(genes)), squeeze=False, layout="constrained")
    for row, gene in enumerate(genes):
        values = np.concatenate(
            [np.asarray(sdata.tables[t][:, gene].X).ravel() for t in ("gd_observed", "gd_predictions")]
        )
        norm = Normalize(vmin=float(np.percentile(values, 1)), vmax=float(np.percentile(values, 99)))
        for col, (table, label) in enumerate((("gd_observed", "observed"), ("gd_predictions", "predicted"))):
            ax = axes[row, col]
            (
                sdata.pl.render_images()
                .pl.render_shapes(color=gene, table_name=table, cmap="viridis", norm=norm, colorbar=False)
                .pl.show(ax=ax, coordinate_systems="global", title=f"{gene} {label}")
            )
        axes[row, 1].set_title(f"{gene} predicted (PCC {scores.loc[gene, 'pcc']:.2f})")
        mappable = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        fig.colorbar(mappable, ax=axes[row, :].tolist(), shrink=0.8, label="log-normalised expression")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    if not np.isfinite(scores.loc[genes, "pcc"]).all():
        logger.warning("Some plotted genes have undefined PCC.")
