"""Per-gene reliability: the validation PCC of each gene in the prediction table, and how well it ranks test PCC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

import genedml_sd as gd
from genedml_sd.tl._evaluate import reliability_spearman

ENCODER = "stain-texture"


@pytest.fixture(scope="module")
def ridge(demo):
    _, c2, c3, _ = demo
    return gd.tl.fit(
        [c2, c3], genes=30, encoder=ENCODER, method="ridge", val_sections=["C3"], seed=0, feature_mode="spot"
    )


def test_prediction_table_carries_validation_pcc_and_rank(demo, ridge):
    b4 = demo[0]
    table = gd.tl.predict(b4, ridge, inplace=False)
    scores = ridge.training["gene_ranking_pcc"]
    assert ridge.training["gene_ranking_source"] == "validation sections"
    expected = pd.Series({g: np.nan if scores[g] is None else scores[g] for g in ridge.genes})
    np.testing.assert_allclose(table.var["reliability_pcc"].to_numpy(), expected.to_numpy())
    ranked = table.var.sort_values("reliability_rank").index.tolist()
    assert ranked == ridge.training["gene_ranking"]
    assert table.var["reliability_rank"].min() == 1 and table.var["reliability_rank"].is_unique
    assert table.uns["genedml_sd"]["reliability_source"] == "validation sections"


def test_reliability_rho_is_spearman_of_estimate_and_test_pcc(demo, ridge):
    import spatialdata as sd

    b4 = demo[0]
    s = sd.SpatialData(images=dict(b4.images), shapes=dict(b4.shapes), tables=dict(b4.tables), attrs=dict(b4.attrs))
    gd.tl.predict(s, ridge)
    ev = gd.tl.evaluate(s, inplace=False)
    per_gene = ev.per_gene
    valid = per_gene.loc[~per_gene["constant"] & per_gene["pcc"].notna(), "pcc"]
    rel = ridge.training["gene_ranking_pcc"]
    genes = [g for g in valid.index if rel.get(g) is not None]
    direct = spearmanr([rel[g] for g in genes], valid.loc[genes]).statistic
    assert reliability_spearman(rel, valid) == pytest.approx(direct, abs=1e-12)
    assert ev.summary["reliability_rho"] == pytest.approx(direct, abs=1e-6)  # float32 table round trip
    # a perfect estimate ranks perfectly; a reversed one gets -1; too few genes give NaN
    assert reliability_spearman(valid.to_dict(), valid) == pytest.approx(1.0)
    assert reliability_spearman((-valid).to_dict(), valid) == pytest.approx(-1.0)
    assert np.isnan(reliability_spearman({"A": 0.1, "B": 0.2}, pd.Series({"A": 0.3, "B": 0.1})))


def test_cross_validate_reports_reliability_rho(demo):
    res = gd.tl.cross_validate(demo[:3], method="ridge", encoder=ENCODER, genes=20, feature_mode="spot")
    folds = res[~res["fold"].isin(["mean", "sd"])]
    assert "reliability_rho" in res.columns and np.isfinite(folds["reliability_rho"].astype(float)).all()
    assert ((folds["reliability_rho"].astype(float) >= -1) & (folds["reliability_rho"].astype(float) <= 1)).all()


def test_ranking_on_large_slides_uses_a_sample_predicted_with_the_whole_slide(monkeypatch):
    import torch

    import genedml_sd.tl._fit as fit_mod
    from genedml_sd.model import GeneDMLConfig, SlideTensors
    from genedml_sd.model._modules import GeneDML

    torch.manual_seed(0)
    n, d, g = 5000, 8, 4
    xy = np.stack(np.meshgrid(np.arange(100), np.arange(50)), -1).reshape(-1, 2) * 100.0
    slide = SlideTensors(torch.randn(n, d), torch.from_numpy(xy).float(), torch.randn(n, 25, d), torch.randn(n, g), "s")
    module = GeneDML(GeneDMLConfig(enc_dim=d, n_genes=g, dim=16, n_heads=2, context_size=256, gene_hidden=16))
    module.prepare([slide])
    module.eval()
    monkeypatch.setattr(fit_mod, "RANKING_ROWS", 2048)
    rows, pred = fit_mod._ranking_predictions(module, slide, batch=512)
    expected_rows = np.sort(np.random.default_rng(0).choice(n, 2048, replace=False))
    np.testing.assert_array_equal(np.sort(rows), expected_rows)
    full = module.predict_slide(slide.local, slide.coords, slide.neighbour).numpy()
    np.testing.assert_allclose(pred, full[rows], atol=1e-5)  # same context as the whole-slide prediction
    small_rows, _ = fit_mod._ranking_predictions(
        module, SlideTensors(slide.local[:100], slide.coords[:100], slide.neighbour[:100], slide.expr[:100], "t")
    )
    np.testing.assert_array_equal(small_rows, np.arange(100))


def test_gene_reliability_plot(demo, ridge):
    import matplotlib

    matplotlib.use("Agg")
    import spatialdata as sd

    b4 = demo[0]
    s = sd.SpatialData(images=dict(b4.images), shapes=dict(b4.shapes), tables=dict(b4.tables), attrs=dict(b4.attrs))
    gd.tl.predict(s, ridge)
    table = s.tables["gd_predictions"]
    fig = gd.pl.gene_reliability(table)
    y = fig.axes[0].lines[0].get_ydata()
    expected = np.sort(table.var["reliability_pcc"].dropna().to_numpy())[::-1]
    np.testing.assert_allclose(y[: len(expected)], expected)
    ev = gd.tl.evaluate(s, inplace=False)
    fig = gd.pl.gene_reliability(table, ev)
    assert f"rho = {ev.summary['reliability_rho']:.2f}" in fig.axes[0].get_title()
    with pytest.raises(KeyError, match="reliability_pcc"):
        gd.pl.gene_reliability(_without_reliability(table))


def _without_reliability(table):
    t = table.copy()
    del t.var["reliability_pcc"]
    return t
