"""Evaluation: metrics against a hand computation, folds, leak-free PCC(H), cross-validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import genedml_sd as gd
from genedml_sd.tl import leave_one_group_out, score_predictions

ENCODER = "stain-texture"


def test_metrics_match_hand_computation_with_a_constant_gene():
    obs = np.array([[1.0, 0.0, 2.0], [2.0, 1.0, 2.0], [3.0, 0.0, 2.0], [4.0, 1.0, 2.0]])
    pred = np.array([[1.5, 0.2, 1.0], [1.0, 0.9, 2.0], [3.5, 0.1, 3.0], [4.0, 0.4, 2.0]])
    ev = score_predictions(pred, obs, ["g1", "g2", "g3"], reference_ranking=["g3", "g2", "g1"], n_top=1)
    pg = ev.per_gene
    for j, g in enumerate(["g1", "g2"]):
        r, p = stats.pearsonr(pred[:, j], obs[:, j])
        assert pg.loc[g, "pcc"] == pytest.approx(r, rel=1e-10)
        assert pg.loc[g, "pvalue"] == pytest.approx(p, rel=1e-6)
    # g3 is constant in the observations: flagged, no PCC, left out of PCC summaries
    assert pg.loc["g3", "constant"] and np.isnan(pg.loc["g3", "pcc"]) and not pg.loc["g1", "constant"]
    assert pg.loc["g1", "mse"] == pytest.approx(np.mean((pred[:, 0] - obs[:, 0]) ** 2))
    assert pg.loc["g2", "mae"] == pytest.approx(np.mean(np.abs(pred[:, 1] - obs[:, 1])))
    r1, r2 = pg.loc["g1", "pcc"], pg.loc["g2", "pcc"]
    s = ev.summary
    assert s["pcc_a"] == pytest.approx((r1 + r2) / 2)
    assert s["pcc_h"] == pytest.approx(max(r1, r2))  # top 1 by test PCC
    assert s["pcc_h_leak_free"] == pytest.approx(r2)  # g3 is skipped (constant), g2 is next in the ranking
    assert s["mse"] == pytest.approx(np.mean((pred - obs) ** 2)) and s["mae"] == pytest.approx(
        np.mean(np.abs(pred - obs))
    )
    assert s["n_constant"] == 1 and s["n_spots"] == 4 and s["n_genes"] == 3


def test_leave_one_group_out_never_shares_a_group():
    groups = ["A", "B", "B", "C", "C", "C", "A"]
    folds = leave_one_group_out(groups)
    assert [f[0] for f in folds] == ["A", "B", "C"]
    for g, train, test in folds:
        assert {groups[i] for i in test} == {g}
        assert g not in {groups[i] for i in train}
        assert sorted(train + test) == list(range(len(groups)))


def test_leak_free_top_genes_ignore_the_test_data():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 6))
    pred = obs + rng.normal(scale=[0.1, 3, 3, 3, 3, 0.2], size=(50, 6))
    genes = list("abcdef")
    ranking = ["c", "d", "a", "b", "e", "f"]
    ev1 = score_predictions(pred, obs, genes, reference_ranking=ranking, n_top=2)
    # destroy what the test data says about c and d: the leak-free choice must not move, the paper's may
    obs2 = obs.copy()
    obs2[:, 0] = rng.permutation(obs2[:, 0])
    ev2 = score_predictions(pred, obs2, genes, reference_ranking=ranking, n_top=2)
    assert ev1.summary["leak_free_genes"] == ev2.summary["leak_free_genes"] == ["c", "d"]
    # the paper-style PCC(H) picks the best genes on the test slide itself, so it is higher
    assert ev1.summary["pcc_h"] > ev1.summary["pcc_h_leak_free"]


@pytest.fixture(scope="module")
def ridge_cv(demo):
    b4, c2, c3, c4 = demo
    return gd.tl.cross_validate(
        [c2, c3, b4, c4], groups="patient", method="ridge", config="default", encoder=ENCODER, genes=30, max_epochs=1
    )


def test_cross_validate_folds_and_summary(ridge_cv):
    df = ridge_cv
    folds = df[~df["fold"].isin(["mean", "sd"])]
    assert list(folds["test_group"]) == ["B", "C"]
    assert folds.iloc[0]["test_sections"] == "B4" and "B4" not in folds.iloc[0]["train_sections"]
    assert set(folds.iloc[1]["test_sections"].split(",")) == {"C2", "C3", "C4"}
    assert "C" not in {s[0] for s in folds.iloc[0]["test_sections"].split(",")} - {"B"}
    mean = df[df["fold"] == "mean"].iloc[0]
    assert mean["pcc_a"] == pytest.approx(folds["pcc_a"].mean())
    assert np.isfinite(folds[["pcc_a", "pcc_h", "pcc_h_leak_free", "mse", "mae"]].to_numpy(float)).all()
    assert (folds["pcc_h"] >= folds["pcc_h_leak_free"] - 1e-12).all()
    assert set(df.attrs["feature_seconds"]) == {"B4", "C2", "C3", "C4"}
    assert len(df.attrs["per_slide"]) == 4


def test_evaluate_on_a_prediction_table(demo):
    b4, c2, c3, c4 = demo
    model = gd.tl.fit([c2, c3], method="ridge", config="default", encoder=ENCODER, genes=25, val_sections=None)
    assert model.training["gene_ranking"] and set(model.training["gene_ranking"]) == set(model.genes)
    gd.tl.predict(c4, model, key_added="gd_eval", overwrite=True)
    try:
        ev = gd.tl.evaluate(c4, pred_key="gd_eval")
        assert ev.summary["table_key"] == "table" and ev.summary["n_spots"] == c4["C4_spots"].shape[0]
        stored = c4.tables["gd_eval"].uns["genedml_sd"]["evaluation"]
        assert stored["summary"]["pcc_a"] == pytest.approx(ev.summary["pcc_a"])
        assert isinstance(stored["per_gene"], pd.DataFrame) and len(stored["per_gene"]) == 25
        # same numbers as scoring by hand from the raw counts
        from genedml_sd.tl._data import resolve_slide_keys, slide_expression

        keys = resolve_slide_keys(c4, None, None, "table", need_table=True)
        obs = slide_expression(c4, keys, model.genes)
        ref = gd.tl.per_gene_pearson(c4.tables["gd_eval"].X, obs, model.genes)
        np.testing.assert_allclose(ev.per_gene["pcc"].to_numpy(), ref["pcc"].to_numpy())
        with pytest.raises(KeyError, match="pred_key|nope"):
            gd.tl.evaluate(c4, pred_key="nope")
    finally:
        del c4.tables["gd_eval"]


def _shuffled_labels(sdata, seed: int):
    """The same slide (image, spots, pixel size) with its counts rows permuted: a no-signal control."""
    import spatialdata as sd

    table = sdata.tables["table"].copy()
    table.X = table.X[np.random.default_rng(seed).permutation(table.n_obs)]
    return sd.SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table}, attrs=dict(sdata.attrs)
    )


@pytest.mark.parametrize("method", ["ridge", "mlp", "bleep"])
def test_each_baseline_beats_shuffled_labels_on_demo_data(demo, method):
    """Trained on real HER2ST demo sections, each baseline beats the same fit on permuted counts.

    Counts rows are permuted within each training section, so the section means survive (a stricter
    null than pooling); the null PCC(A) on the held-out section is averaged over three permutations.
    """
    b4, c2, c3, c4 = demo
    kw = {"method": method, "config": "default", "encoder": ENCODER, "genes": 50, "val_sections": None}
    kw |= {"max_epochs": 8, "batch_size": 128, "seed": 0}

    def pcc_a(train) -> float:
        model = gd.tl.fit(train, **kw)
        gd.tl.predict(c4, model, key_added="gd_control", overwrite=True)
        try:
            return gd.tl.evaluate(c4, pred_key="gd_control").summary["pcc_a"]
        finally:
            del c4.tables["gd_control"]

    real = pcc_a([b4, c2, c3])
    null = [pcc_a([_shuffled_labels(s, 10 * k + i) for i, s in enumerate([b4, c2, c3])]) for k in range(3)]
    assert real > max(null) and real > np.mean(null) + 0.05, (method, real, null)


@pytest.fixture(scope="module")
def ridge25(demo):
    b4, c2, c3, c4 = demo
    return gd.tl.fit([c2, c3], method="ridge", config="default", encoder=ENCODER, genes=25, val_sections=None)


def test_predictions_plot_with_squidpy_defaults(demo, ridge25):
    """uns['spatial'] puts each spot on its own place of the stored overview image (µm coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import squidpy as sq

    from genedml_sd._spatial import spots_to_pixels
    from genedml_sd.tiling import SlideReader

    b4, c2, c3, c4 = demo
    model = ridge25
    table = gd.tl.predict(c4, model, inplace=False)
    (library_id,) = table.uns["spatial"]
    assert library_id == "C4_he"
    lib = table.uns["spatial"][library_id]
    hires, scalef = lib["images"]["hires"], lib["scalefactors"]["tissue_hires_scalef"]
    reader = SlideReader.from_sdata(c4, "C4_he")
    assert max(hires.shape[:2]) <= 2000 and hires.dtype == np.uint8 and hires.shape[2] == 3
    # spot centres in overview pixels: µm x scalef == level-0 pixels / overview downsampling, to within
    # half an overview pixel (pyramid levels of odd sizes are not exactly 2x apart along y and x)
    _, um = reader.overview()
    px0 = spots_to_pixels(c4, "C4_spots", "C4_he")
    expected = px0 * reader.um_per_px0 / np.array([um[1], um[0]])
    np.testing.assert_allclose(table.obsm["spatial"] * scalef, expected, atol=0.5)
    # spot diameter in µm: the legacy ST spots are 100 µm apart; their diameter is about half that
    assert 40 < lib["scalefactors"]["spot_diameter_fullres"] < 120
    sq.pl.spatial_scatter(table, color=model.genes[0])
    ax = plt.gcf().axes[0]
    assert ax.images, "the tissue image was not drawn"
    plt.close("all")


def test_few_shared_genes_warn_and_evaluate_scores_the_shared_ones(demo, ridge25):
    import spatialdata as sd

    b4, c2, c3, c4 = demo
    model = ridge25
    table = c4.tables["table"].copy()
    renamed = {g: f"{g}_other" for g in model.genes[10:]}  # only the first 10 model genes stay measured
    table.var_names = [renamed.get(g, g) for g in table.var_names]
    other = sd.SpatialData(
        images=dict(c4.images), shapes=dict(c4.shapes), tables={"table": table}, attrs=dict(c4.attrs)
    )
    with pytest.warns(UserWarning, match="measures only 10 of the model's 25 genes"):
        gd.tl.predict(other, model, key_added="pred", overview_px=None)
    assert "spatial" not in other.tables["pred"].uns
    with pytest.raises(KeyError, match="15 of 25 predicted genes are not measured.*genes='shared'"):
        gd.tl.evaluate(other, pred_key="pred")
    with pytest.warns(UserWarning, match="Scoring 10 of the 25 predicted genes"):
        ev = gd.tl.evaluate(other, pred_key="pred", genes="shared")
    assert list(ev.per_gene.index) == model.genes[:10]
    # library sizes still come from all measured genes: same per-gene PCC as on the intact slide
    gd.tl.predict(c4, model, key_added="gd_full", overwrite=True, overview_px=None)
    try:
        full = gd.tl.evaluate(c4, pred_key="gd_full", inplace=False)
    finally:
        del c4.tables["gd_full"]
    np.testing.assert_allclose(ev.per_gene["pcc"].to_numpy(), full.per_gene["pcc"].to_numpy()[:10])
    with pytest.raises(ValueError, match="genes must be None, 'shared'"):
        gd.tl.evaluate(other, pred_key="pred", genes="all")


def test_predict_writes_only_its_table_to_a_backed_store(demo, ridge25, tmp_path):
    import spatialdata as sd

    b4, c2, c3, c4 = demo
    path = tmp_path / "c4.zarr"
    sd.SpatialData(
        images=dict(c4.images), shapes=dict(c4.shapes), tables={"table": c4.tables["table"]}, attrs=dict(c4.attrs)
    ).write(path)
    backed = sd.read_zarr(path)
    image_files = sorted(p.relative_to(path) for p in (path / "images").rglob("*"))
    gd.tl.predict(backed, ridge25, key_added="pred", overview_px=64)
    on_disk = sd.read_zarr(path)
    assert "pred" in on_disk.tables and on_disk.tables["pred"].uns["genedml_sd"]["kind"] == "predictions"
    np.testing.assert_allclose(on_disk.tables["pred"].X, backed.tables["pred"].X)
    assert sorted(p.relative_to(path) for p in (path / "images").rglob("*")) == image_files  # the rest untouched
    # a table of that name on disk is replaced only with overwrite, even when absent from memory
    del backed.tables["pred"]
    with pytest.raises(KeyError, match="'pred' already exists"):
        gd.tl.predict(backed, ridge25, key_added="pred")
    gd.tl.predict(backed, ridge25, key_added="pred", overwrite=True, overview_px=None)
    assert "spatial" not in sd.read_zarr(path).tables["pred"].uns


def test_cross_validate_extracts_neighbour_grids_only_for_methods_that_read_them():
    from genedml_sd.tl._cross_validate import _needs_neighbours

    assert _needs_neighbours("gene-dml", "full", {}, enc_dim=8, genes=25)
    assert _needs_neighbours("gene-dml", "full", {"batch_size": 64}, enc_dim=8, genes=["A", "B"])  # a fit argument
    assert not _needs_neighbours("gene-dml", "no-multiscale", {}, enc_dim=8, genes=25)
    assert not _needs_neighbours("gene-dml", "full", {"use_neighbour": False}, enc_dim=8, genes=25)
    # NH2ST builds its context from spot positions and local features, not from neighbour tiles
    for method in ("nh2st", "ridge", "mlp", "bleep"):
        assert not _needs_neighbours(method, "default", {}, enc_dim=8, genes=25)
    # a config fit would reject: extract everything and let fit raise its own error
    assert _needs_neighbours("ridge", "no-such-preset", {}, enc_dim=8, genes=25)
