"""Seed ensembles: mean prediction, per-observation uncertainty, and that it is larger where predictions are worse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import spearmanr

import genedml_sd as gd
from genedml_sd.tl._ensemble import (
    check_ensemble,
    ensemble_predictions,
    mean_reliability,
    observation_uncertainty,
    uncertainty_spearman,
)

ENCODER = "stain-texture"
FIT = {"genes": 25, "encoder": ENCODER, "method": "mlp", "val_sections": ["C3"], "feature_mode": "spot"}


@pytest.fixture(scope="module")
def members(demo):
    _, c2, c3, _ = demo
    return gd.tl.fit_ensemble([c2, c3], n_models=3, seed=0, max_epochs=4, **FIT)


@pytest.fixture(scope="module")
def b4_copy(demo):
    import spatialdata as sd

    b4 = demo[0]
    return sd.SpatialData(images=dict(b4.images), shapes=dict(b4.shapes), tables=dict(b4.tables), attrs=dict(b4.attrs))


def test_fit_ensemble_trains_one_member_per_seed(members):
    assert [m.training["seed"] for m in members] == [0, 1, 2]
    assert all(m.genes == members[0].genes for m in members)
    w = [next(m.module.parameters()).detach().numpy() for m in members]
    assert not np.allclose(w[0], w[1])  # another seed, other weights


def test_mean_and_spread_equal_a_direct_computation(demo, members):
    b4 = demo[0]
    feats = members[0].features.extract(b4, members[0].encoder.load(), image_key="B4_he", shapes_key="B4_spots")
    each = np.stack([m.predict_features(feats) for m in members])
    mean, sd = ensemble_predictions(members, feats)
    np.testing.assert_allclose(mean, each.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd, each.std(0, ddof=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(observation_uncertainty(sd), each.std(0, ddof=1).mean(1), rtol=1e-4, atol=1e-6)
    one_mean, one_sd = ensemble_predictions(members[:1], feats)
    np.testing.assert_allclose(one_mean, each[0])
    assert one_sd is None


def test_predict_with_a_list_writes_uncertainty_and_evaluate_scores_it(b4_copy, members):
    gd.tl.predict(b4_copy, members, overwrite=True)
    table = b4_copy.tables["gd_predictions"]
    assert table.layers["sd"].shape == table.shape and (table.layers["sd"] >= 0).all()
    np.testing.assert_allclose(table.obs["uncertainty"].to_numpy(), table.layers["sd"].mean(1), rtol=1e-5)
    assert table.uns["genedml_sd"]["ensemble"] == {"n_models": 3, "seeds": [0, 1, 2]}
    rel = mean_reliability(members)
    for g in members[0].genes[:5]:
        vals = [m.training["gene_ranking_pcc"][g] for m in members]
        assert table.var.loc[g, "reliability_pcc"] == pytest.approx(np.mean(vals))
        assert rel[g] == pytest.approx(np.mean(vals))
    ev = gd.tl.evaluate(b4_copy, inplace=False)
    paired = gd.tl.observed_and_predicted(b4_copy)
    err = ((paired.predicted - paired.observed) ** 2).mean(1)
    direct = spearmanr(paired.uncertainty, err).statistic
    assert ev.summary["uncertainty_rho"] == pytest.approx(direct, abs=1e-12)
    # a single model writes no uncertainty
    one = gd.tl.predict(b4_copy, members[0], inplace=False)
    assert "uncertainty" not in one.obs and "sd" not in one.layers
    assert "uncertainty_rho" not in gd.tl.score_predictions(paired.predicted, paired.observed, paired.genes).summary


def test_uncertainty_is_larger_where_predictions_are_worse(demo, members):
    """Constructed case: half of B4's spots get features far outside the training distribution."""
    b4 = demo[0]
    feats = members[0].features.extract(b4, members[0].encoder.load(), image_key="B4_he", shapes_key="B4_spots")
    rng = np.random.default_rng(0)
    shifted = rng.random(feats.n_spots) < 0.5
    local = feats.local.astype(np.float32).copy()
    scale = local.std(0, keepdims=True)
    local[shifted] += 6 * scale * rng.standard_normal((int(shifted.sum()), local.shape[1])).astype(np.float32)
    ood = dataclasses.replace(feats, local=local)
    mean, sd = ensemble_predictions(members, ood)
    u = observation_uncertainty(sd)
    obs = gd.pp.normalized_expression(b4.tables["table"], members[0].genes)
    err = ((mean - obs) ** 2).mean(1)
    assert u[shifted].mean() > 2 * u[~shifted].mean()
    assert err[shifted].mean() > err[~shifted].mean()
    assert uncertainty_spearman(u, mean, obs) > 0.3


def test_uncertainty_spearman_by_hand():
    obs = np.zeros((5, 2))
    pred = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=float)  # errors 0, 1, 4, 9, 16
    assert uncertainty_spearman(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), pred, obs) == pytest.approx(1.0)
    assert uncertainty_spearman(np.array([5, 4, 3, 2, 1.0]), pred, obs) == pytest.approx(-1.0)
    assert np.isnan(uncertainty_spearman(np.ones(5), pred, obs))
    with pytest.raises(ValueError, match="4 values for 5 observations"):
        uncertainty_spearman(np.ones(4), pred, obs)


def test_members_must_share_genes_and_features(members):
    with pytest.raises(ValueError, match="empty"):
        check_ensemble([])
    with pytest.raises(TypeError, match="member 1 is a str"):
        check_ensemble([members[0], "model"])
    other_genes = dataclasses.replace(members[1], genes=list(reversed(members[1].genes)))
    with pytest.raises(ValueError, match="member 1 .*another order"):
        check_ensemble([members[0], other_genes])
    other_geometry = dataclasses.replace(members[1], features=dataclasses.replace(members[1].features, mode="lattice"))
    with pytest.raises(ValueError, match="member 1 was trained on other features"):
        check_ensemble([members[0], other_geometry])
    with pytest.raises(ValueError, match="n_models must be an integer >= 2"):
        gd.tl.fit_ensemble([], n_models=1)


def test_uncertainty_plot_on_the_tissue(b4_copy, members):
    import matplotlib.pyplot as plt

    gd.tl.predict(b4_copy, members, overwrite=True)
    fig = gd.pl.uncertainty(b4_copy)
    panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(panels) == 2
    paired = gd.tl.observed_and_predicted(b4_copy)
    rho = uncertainty_spearman(paired.uncertainty, paired.predicted, paired.observed)
    assert panels[0].get_title().startswith("uncertainty")
    assert f"rho with uncertainty = {rho:.2f}" in panels[1].get_title()
    assert "3-model ensemble" in fig._suptitle.get_text()
    plt.close(fig)
    fig = gd.pl.uncertainty(b4_copy, with_error=False)
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 1
    plt.close(fig)
    gd.tl.predict(b4_copy, members[0], key_added="single", overwrite=True)
    with pytest.raises(KeyError, match="'single' has no obs\\['uncertainty'\\]"):
        gd.pl.uncertainty(b4_copy, pred_key="single")


def test_slide_standardisation_in_training_and_prediction(demo):
    b4, c2, c3, _ = demo
    model = gd.tl.fit([c2, c3], slide_standardise=True, max_epochs=2, **{**FIT, "method": "ridge"})
    assert model.features.slide_standardise and model.features.to_dict()["slide_standardise"] is True
    feats = model.features.extract(b4, model.encoder.load(), image_key="B4_he", shapes_key="B4_spots")
    std = model.features.standardise(feats)
    x = feats.local.astype(np.float64)
    np.testing.assert_allclose(std.local, (x - x.mean(0)) / np.where(x.std(0, ddof=1) > 1e-6, x.std(0, ddof=1), 1))
    np.testing.assert_allclose(std.local.mean(0), 0, atol=1e-5)
    assert feats.local is not std.local and not np.allclose(feats.local, std.local)  # the cache copy is untouched
    # prediction standardises the new slide by its own statistics: a slide-wide shift of every feature
    # (another stain) changes nothing
    shifted = dataclasses.replace(feats, local=feats.local * 1.5 + 3.0)
    np.testing.assert_allclose(model.predict_features(shifted), model.predict_features(feats), rtol=1e-4, atol=1e-4)
    plain = dataclasses.replace(model, features=dataclasses.replace(model.features, slide_standardise=False))
    assert not np.allclose(plain.predict_features(shifted), plain.predict_features(feats), atol=1e-2)
    # the flag survives save / load
    assert gd.tl.FeatureSpec.from_dict(model.features.to_dict()).slide_standardise
    assert "slide_standardise" not in plain.features.to_dict()  # older models' dicts are unchanged
    with pytest.raises(TypeError, match="slide_standardise must be True or False"):
        gd.tl.fit([c2, c3], slide_standardise="yes", **FIT)


def test_cross_validate_with_an_ensemble_reports_uncertainty_and_the_ceiling(demo):
    import pandas as pd

    slides = list(demo[:3])  # B4 (patient B), C2, C3 (patient C): two folds
    kw = {"encoder": ENCODER, "genes": 20, "feature_mode": "spot", "max_epochs": 2, "method": "mlp"}
    res = gd.tl.cross_validate(slides, n_models=2, keep_predictions=True, **kw)
    folds = res[~res["fold"].isin(["mean", "sd"])]
    rho = folds["uncertainty_rho"].astype(float)
    assert np.isfinite(rho).all() and ((rho >= -1) & (rho <= 1)).all()
    assert res.attrs["n_models"] == 2
    # the ceiling reference of a fold: the neighbour mean of its test slide, scored on the fold's genes
    fold_b = folds[folds["test_group"] == "B"].iloc[0]
    genes = res.attrs["predictions"]["B4"]["genes"]
    ceiling, observed = gd.tl.neighbour_reference(demo[0], genes)
    np.testing.assert_allclose(observed, res.attrs["predictions"]["B4"]["observed"], rtol=1e-5, atol=1e-5)
    direct = gd.tl.score_predictions(ceiling, observed, genes).summary["pcc_a"]
    assert fold_b["neighbour_pcc_a"] == pytest.approx(direct, abs=1e-6)
    # results with per-gene tables and kept arrays in attrs still concatenate (and filter) like plain frames
    single = gd.tl.cross_validate(slides, **kw)
    both = pd.concat([res, single[single["fold"] != "sd"]], ignore_index=True)
    assert len(both) == len(res) + len(single) - 1
    assert "uncertainty_rho" not in single.columns
    with pytest.raises(ValueError, match="n_models must be an integer >= 1"):
        gd.tl.cross_validate(slides, n_models=0, **kw)
