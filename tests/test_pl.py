from __future__ import annotations

import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import genedml_sd as gd

PRED_KEY = "gd_pl"
FIT = {"config": "default", "encoder": "stain-texture", "genes": 20, "table_key": "table"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Ridge on C3 predicting C4 into table ``gd_pl``; a 3-epoch MLP (train C4, validate C3) for training curves.

    Only two sections are encoded (feature extraction dominates the runtime on a busy 2-core machine).
    """
    _, _, c3, c4 = demo
    with pytest.MonkeyPatch.context() as mp:
        # same cache as conftest's per-test fixture, so features are shared across the session
        mp.setattr(gd.settings, "cache_dir", tmp_path_factory.getbasetemp() / "gd-cache")
        mp.setattr(gd.settings, "progress", False)
        ridge = gd.tl.fit([c3], method="ridge", val_sections=None, **FIT)
        mlp = gd.tl.fit([c3, c4], method="mlp", max_epochs=3, val_sections=["C3"], seed=0, **FIT)
        gd.tl.predict(c4, ridge, key_added=PRED_KEY, overwrite=True)
    try:
        yield {"c4": c4, "ridge": ridge, "mlp": mlp}
    finally:
        if PRED_KEY in c4.tables:
            del c4.tables[PRED_KEY]


def _png_ok(path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 0
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert gray.std() > 10, f"{path.name} looks blank (grayscale std {gray.std():.1f})"
    return np.asarray(Image.open(path).convert("RGB"))


def _panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def _observed(c4, genes):
    """Log-normalised observed counts of C4 in the prediction table's row order."""
    table = c4.tables["table"]
    pred = c4.tables[PRED_KEY]
    pos = {str(s): i for i, s in enumerate(table.obs["spot_id"])}
    rows = [pos[str(s)] for s in pred.obs["spot_id"]]
    return gd.pp.normalized_expression(table[rows], genes)


def _top_genes(c4, n):
    genes = list(c4.tables[PRED_KEY].var_names)
    pred = np.asarray(c4.tables[PRED_KEY].X)
    scores = gd.tl.per_gene_pearson(pred, _observed(c4, genes), genes)
    return scores, list(scores["pcc"].sort_values(ascending=False).index[:n])


# --------------------------------------------------------------------------------------------- predicted vs observed
def test_predicted_vs_observed(trained, tmp_path):
    c4 = trained["c4"]
    tables_before = {k: id(v) for k, v in c4.tables.items()}
    x_before = np.asarray(c4.tables[PRED_KEY].X).copy()
    scores, genes = _top_genes(c4, 2)
    path = tmp_path / "pvo.png"

    fig = gd.pl.predicted_vs_observed(c4, genes, pred_key=PRED_KEY, save=path)

    rgb = _png_ok(path)
    assert rgb.shape[0] > 300 and rgb.shape[1] > 500
    panels, cbars = _panels(fig), _colorbars(fig)
    assert len(panels) == 2 * len(genes)  # observed + predicted per gene
    assert len(cbars) == len(genes)  # one colorbar per gene row
    # the user's SpatialData is untouched: same tables (same objects), same predictions
    assert {k: id(v) for k, v in c4.tables.items()} == tables_before
    np.testing.assert_array_equal(np.asarray(c4.tables[PRED_KEY].X), x_before)
    for i, gene in enumerate(genes):
        obs_ax, pred_ax = panels[2 * i], panels[2 * i + 1]
        assert obs_ax.get_title().startswith(f"{gene} observed")
        assert pred_ax.get_title().startswith(f"{gene} predicted")
        # H&E drawn (an image artist) and spots drawn (a collection) in both panels
        for a in (obs_ax, pred_ax):
            assert a.get_images(), f"no H&E in panel {a.get_title()!r}"
            assert a.collections, f"no spots in panel {a.get_title()!r}"
        pcc = float(re.search(r"PCC = (-?\d+\.\d+)", pred_ax.get_title()).group(1))
        assert pcc == pytest.approx(scores.loc[gene, "pcc"], abs=5e-4)
        # shared colour scale: 1st-99th percentile of observed and predicted together
        obs = _observed(c4, [gene])[:, 0]
        pred = np.asarray(c4.tables[PRED_KEY][:, gene].X).ravel()
        lo, hi = np.percentile(np.concatenate([obs, pred]), [1, 99])
        norm = cbars[i]._colorbar.norm
        assert (norm.vmin, norm.vmax) == pytest.approx((lo, hi), rel=1e-5)
    # the viridis spots are in the PNG: some strongly green/yellow pixels exist (H&E is pink/purple)
    r, g, b = (rgb[..., k].astype(int) for k in range(3))
    assert ((g > r + 40) & (g > b + 40)).sum() > 200


def test_predicted_vs_observed_ncols_and_single_gene(trained, tmp_path):
    c4 = trained["c4"]
    _, genes = _top_genes(c4, 3)
    fig = gd.pl.predicted_vs_observed(c4, genes, pred_key=PRED_KEY, ncols=2, save=tmp_path / "grid.png")
    _png_ok(tmp_path / "grid.png")
    assert len(_panels(fig)) == 6 and len(_colorbars(fig)) == 3  # unused grid cells removed
    fig = gd.pl.predicted_vs_observed(c4, genes[0], pred_key=PRED_KEY, cmap="magma")
    assert len(_panels(fig)) == 2 and len(_colorbars(fig)) == 1
    assert fig.axes[1].get_title().startswith(f"{genes[0]} predicted")


def test_predicted_vs_observed_errors(trained):
    c4 = trained["c4"]
    n_figs = len(plt.get_fignums())
    with pytest.raises(KeyError, match=r"NOT_A_GENE.*'gd_pl'"):
        gd.pl.predicted_vs_observed(c4, ["NOT_A_GENE"], pred_key=PRED_KEY)
    with pytest.raises(KeyError, match=r"gd_missing.*'table'"):
        gd.pl.predicted_vs_observed(c4, "ERBB2", pred_key="gd_missing")
    with pytest.raises(KeyError, match="nope"):
        gd.pl.predicted_vs_observed(c4, c4.tables[PRED_KEY].var_names[0], pred_key=PRED_KEY, table_key="nope")
    assert len(plt.get_fignums()) == n_figs  # errors raised before any figure is made
    assert set(c4.tables) == {"table", PRED_KEY}


# --------------------------------------------------------------------------------------------- gene scores
def test_gene_scores_evaluation(trained, tmp_path):
    c4 = trained["c4"]
    ev = gd.tl.evaluate(c4, pred_key=PRED_KEY, inplace=False)
    fig = gd.pl.gene_scores(ev, top=5, save=tmp_path / "scores.png")
    _png_ok(tmp_path / "scores.png")
    dist, bars = fig.axes[0], fig.axes[1]
    expected = list(ev.per_gene["pcc"].sort_values(ascending=False).index[:5])
    assert [t.get_text() for t in bars.get_yticklabels()] == expected
    assert sorted(p.get_width() for p in bars.patches) == pytest.approx(sorted(ev.per_gene.loc[expected, "pcc"]))
    legend = [t.get_text() for t in dist.get_legend().get_texts()]
    assert f"PCC(A) = {ev.summary['pcc_a']:.3f}" in legend
    # histogram counts every non-constant gene once
    n_valid = int((~ev.per_gene["constant"]).sum())
    assert sum(p.get_height() for p in dist.patches) == n_valid
    # a per-gene table works too, and a single Axes gets the distribution only
    fig2, ax = plt.subplots()
    out = gd.pl.gene_scores(ev.per_gene, metric="mse", ax=ax)
    assert out is fig2 and len(fig2.axes) == 1
    with pytest.raises(KeyError, match="metric"):
        gd.pl.gene_scores(ev, metric="nope")
    with pytest.raises(TypeError):
        gd.pl.gene_scores([1, 2, 3])


def _cv_frame(method: str, pcc: list[float], leak_free: list[float]) -> pd.DataFrame:
    """A frame shaped like gd.tl.cross_validate's output (fold rows, then mean and sd rows)."""
    groups = [f"P{i}" for i in range(len(pcc))]
    df = pd.DataFrame(
        {
            "fold": list(range(len(pcc))),
            "test_group": groups,
            "pcc_a": pcc,
            "pcc_h": np.add(leak_free, 0.05),
            "pcc_h_leak_free": leak_free,
            "mse": np.subtract(1, pcc),
            "mae": np.subtract(0.8, pcc),
        }
    )
    num = ["pcc_a", "pcc_h", "pcc_h_leak_free", "mse", "mae"]
    summary = pd.DataFrame(
        [
            {"fold": "mean", "test_group": "all", **df[num].mean().to_dict()},
            {"fold": "sd", "test_group": "all", **df[num].std(ddof=1).to_dict()},
        ]
    )
    out = pd.concat([df.astype({"fold": object}), summary], ignore_index=True)
    out.attrs.update(
        {
            "method": method,
            "per_slide": [
                {"fold": i, "test_group": g, "section": f"{g}{k}", "pcc_a": p + 0.02 * (k - 0.5)}
                for i, (g, p) in enumerate(zip(groups, pcc, strict=True))
                for k in range(2)
            ],
        }
    )
    return out


def test_gene_scores_cross_validation(tmp_path):
    cv = {
        "gene-dml": _cv_frame("gene-dml", [0.30, 0.42, 0.36, 0.25], [0.50, 0.58, 0.55, 0.40]),
        "ridge": _cv_frame("ridge", [0.20, 0.31, 0.28, 0.15], [0.41, 0.47, 0.44, 0.33]),
    }
    fig = gd.pl.gene_scores(cv, save=tmp_path / "cv.png")
    _png_ok(tmp_path / "cv.png")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gene-dml", "ridge"]
    heights = sorted(p.get_height() for p in ax.patches)
    means = sorted(
        float(df.loc[df["fold"] == "mean", c].iloc[0]) for df in cv.values() for c in ("pcc_a", "pcc_h_leak_free")
    )
    assert heights == pytest.approx(means)  # one mean bar per method and metric
    fold_points = [c for c in ax.collections if len(c.get_offsets()) == 4 and c.get_facecolor().size]
    assert len(fold_points) >= 4  # per-fold dots: 2 methods x 2 metrics
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"PCC(A)", "PCC(H) leak-free"}
    # a single cross_validate frame and an error metric
    fig = gd.pl.gene_scores(cv["ridge"], metric="mse")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["ridge"]
    with pytest.raises(KeyError, match="metric"):
        gd.pl.gene_scores(cv, metric="r2")


# --------------------------------------------------------------------------------------------- training curves
def test_training_curves_real_model(trained, tmp_path):
    model = trained["mlp"]
    fig = gd.pl.training_curves(model, save=tmp_path / "curves.png")
    _png_ok(tmp_path / "curves.png")
    titles = [a.get_title() for a in fig.axes]
    assert "Training losses" in titles and "Validation" in titles
    loss_ax = fig.axes[titles.index("Training losses")]
    train_keys = [k for k in model.history[0] if k.startswith("train/")]
    assert {ln.get_label() for ln in loss_ax.get_lines()} >= set(train_keys)
    best = int(np.argmax([row["val/pcc"] for row in model.history]))
    vlines = [ln for ln in loss_ax.get_lines() if ln.get_linestyle() == "--"]
    assert vlines and vlines[0].get_xdata()[0] == model.history[best]["epoch"]
    assert f"best epoch {model.history[best]['epoch']}" in fig.get_suptitle()
    # a ridge model has one epoch and no validation: one panel
    fig = gd.pl.training_curves(trained["ridge"])
    assert [a.get_title() for a in fig.axes] == ["Training losses"]


def _synthetic_history(n=30):
    e = np.arange(n)
    val = 0.3 * (1 - np.exp(-e / 4)) - 0.004 * e  # peaks then decays
    return [
        {
            "epoch": int(i),
            "train/total": 2 * np.exp(-i / 8) + 0.5,
            "train/instance": np.exp(-i / 8) + 0.2,
            "train/group": 0.5 * np.exp(-i / 12) + 0.2,
            "train/pred": 0.5 * np.exp(-i / 6) + 0.1,
            "val/pcc": float(val[i]),
            "val/mse": float(0.9 - val[i]),
            "lr": 1e-3 * 0.5 ** (i // 10),
        }
        for i in e
    ], int(np.argmax(val))


def test_training_curves_synthetic(tmp_path):
    history, best = _synthetic_history()
    fig = gd.pl.training_curves(history, save=tmp_path / "synthetic.png")
    _png_ok(tmp_path / "synthetic.png")
    loss_ax = fig.axes[0]
    labels = {ln.get_label() for ln in loss_ax.get_lines()}
    assert {"train/total", "train/instance", "train/group", "train/pred"} <= labels
    assert any(ax.get_ylabel() == "learning rate" for ax in fig.axes)  # lr schedule on a twin axis
    assert fig.get_suptitle().startswith(f"best epoch {best} ")
    # keys select curves; user Axes are used and only as many panels as given are drawn
    fig2, axes = plt.subplots(1, 2)
    out = gd.pl.training_curves(history, keys=["train/pred", "val/pcc"], ax=axes)
    assert out is fig2
    assert [ln.get_label() for ln in axes[0].get_lines() if not ln.get_label().startswith("_")] == ["train/pred"]
    assert "val/pcc" in [ln.get_label() for ln in axes[1].get_lines()]
    with pytest.raises(KeyError, match="val/r2"):
        gd.pl.training_curves(history, keys=["val/r2"])
    with pytest.raises(ValueError, match="empty"):
        gd.pl.training_curves([])
    with pytest.raises(TypeError):
        gd.pl.training_curves(42)


def test_import_pl_does_not_import_torch():
    code = "import sys, genedml_sd.pl; assert 'torch' not in sys.modules; assert 'spatialdata_plot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
