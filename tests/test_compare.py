from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import genedml_sd as gd
from genedml_sd.tl import score_predictions

ENCODER = "stain-texture"
GENES = [f"g{j}" for j in range(10)]
# fold -> test sections (fold 1 tests two slides, as a patient with two sections)
LAYOUT = {0: ["S0"], 1: ["S1a", "S1b"], 2: ["S2"]}


def _observed(seed: int = 0, n_spots: int = 40) -> dict[str, np.ndarray]:
    """Per-section observed expression: correlated genes, one sparse gene (two non-zero spots), one constant on S2."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, section in enumerate(s for secs in LAYOUT.values() for s in secs):
        n = n_spots + 7 * k
        programme = rng.normal(size=(n, 1))
        obs = programme + 0.7 * rng.normal(size=(n, len(GENES)))
        obs[:, 0] = 0.0
        obs[rng.choice(n, 2, replace=False), 0] = [1.0, 2.0]
        if section == "S2":
            obs[:, 1] = 0.5
        out[section] = obs
    return out


def _fake_cv(method: str, predicted: dict[str, np.ndarray], observed: dict[str, np.ndarray], *, keep=True):
    """A frame shaped like gd.tl.cross_validate's (fold rows, mean and sd rows, attrs) from given arrays."""
    rows, per_slide, per_gene, predictions = [], [], [], {}
    for fold, sections in LAYOUT.items():
        scores = []
        for section in sections:
            ev = score_predictions(predicted[section], observed[section], GENES)
            scores.append(ev.summary["pcc_a"])
            per_slide.append({"fold": fold, "test_group": f"P{fold}", "section": section, "pcc_a": scores[-1]})
            pg = ev.per_gene
            per_gene.append(
                pd.DataFrame(
                    {
                        "fold": fold,
                        "test_group": f"P{fold}",
                        "section": section,
                        "gene": list(pg.index),
                        "pcc": pg["pcc"].to_numpy(),
                        "constant": pg["constant"].to_numpy(),
                    }
                )
            )
            predictions[section] = {
                "fold": fold,
                "genes": list(GENES),
                "predicted": predicted[section].astype(np.float32),
                "observed": observed[section].astype(np.float32),
            }
        rows.append(
            {"fold": fold, "test_group": f"P{fold}", "test_sections": ",".join(sections), "pcc_a": np.nanmean(scores)}
        )
    df = pd.DataFrame(rows)
    summary = pd.DataFrame(
        [
            {"fold": "mean", "test_group": "all", "pcc_a": df["pcc_a"].mean()},
            {"fold": "sd", "test_group": "all", "pcc_a": df["pcc_a"].std(ddof=1)},
        ]
    )
    out = pd.concat([df.astype({"fold": object}), summary], ignore_index=True)
    out.attrs.update({"method": method, "per_slide": per_slide, "per_gene": pd.concat(per_gene, ignore_index=True)})
    if keep:
        out.attrs["predictions"] = predictions
    return out


def _noisy(observed, scale, seed):
    rng = np.random.default_rng(seed)
    return {s: o + scale * rng.normal(size=o.shape) for s, o in observed.items()}


@pytest.fixture(scope="module")
def observed():
    # float32 round trip first, so the fakes' per-gene PCCs are those of the arrays kept in attrs["predictions"]
    return {s: o.astype(np.float32).astype(np.float64) for s, o in _observed().items()}


@pytest.fixture(scope="module")
def good_bad(observed):
    def f32(d):
        return {s: v.astype(np.float32).astype(np.float64) for s, v in d.items()}

    good = _fake_cv("good", f32(_noisy(observed, 0.4, 1)), observed)
    bad = _fake_cv("bad", f32(_noisy(observed, 2.0, 2)), observed)
    return good, bad


def _mean_pcc(df):
    return float(df.loc[df["fold"] == "mean", "pcc_a"].iloc[0])


def _pooled_differences(a, b):
    m = a.attrs["per_gene"].merge(b.attrs["per_gene"], on=["fold", "section", "gene"], suffixes=("_a", "_b"))
    ok = ~m["constant_a"] & m["pcc_a"].notna() & m["pcc_b"].notna()
    return (m.loc[ok, "pcc_a"] - m.loc[ok, "pcc_b"]).to_numpy()


def test_delta_wilcoxon_and_folds_match_direct_computations(good_bad):
    a, b = good_bad
    res = gd.tl.compare_methods(a, b, n_boot=200)
    assert len(res) == 1
    row = res.iloc[0]
    assert (row["method_a"], row["method_b"]) == ("good", "bad")
    assert row["delta_pcc_a"] == pytest.approx(_mean_pcc(a) - _mean_pcc(b), abs=1e-12)
    assert row["pcc_a_a"] == pytest.approx(_mean_pcc(a), abs=1e-12)
    diffs = _pooled_differences(a, b)
    # 10 genes x 4 slides, minus the gene constant on S2
    assert row["n_pairs"] == len(diffs) == 39
    assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-12)
    assert row["frac_genes_a_better"] == pytest.approx(np.mean(diffs > 0))
    fold_a = a.loc[~a["fold"].isin(["mean", "sd"]), "pcc_a"].to_numpy(float)
    fold_b = b.loc[~b["fold"].isin(["mean", "sd"]), "pcc_a"].to_numpy(float)
    np.testing.assert_allclose(row["fold_deltas"], fold_a - fold_b, atol=1e-12)
    assert row["n_folds"] == 3 and row["folds_a_better"] == int(np.sum(fold_a > fold_b))


def test_a_clearly_better_gives_ci_above_zero(good_bad):
    a, b = good_bad
    for resample in ("spots", "genes"):
        row = gd.tl.compare_methods(a, b, n_boot=300, resample=resample).iloc[0]
        assert row["ci_method"] == resample
        assert 0 < row["ci_low"] < row["delta_pcc_a"] < row["ci_high"], row
        assert row["excludes_zero"] and row["wilcoxon_p"] < 0.01
        assert row["folds_a_better"] == 3 and row["frac_genes_a_better"] > 0.8
    # reversed: the same numbers with the sign flipped
    rev = gd.tl.compare_methods(b, a, n_boot=300).iloc[0]
    fwd = gd.tl.compare_methods(a, b, n_boot=300).iloc[0]
    assert rev["delta_pcc_a"] == pytest.approx(-fwd["delta_pcc_a"])
    assert rev["ci_high"] == pytest.approx(-fwd["ci_low"]) and rev["wilcoxon_p"] == pytest.approx(fwd["wilcoxon_p"])
    assert rev["folds_a_better"] == 0


def test_identical_results_give_zero(good_bad):
    a = good_bad[0]
    for resample in ("spots", "genes"):
        row = gd.tl.compare_methods(a, a, n_boot=50, resample=resample).iloc[0]
        assert row["delta_pcc_a"] == 0 and row["ci_low"] <= 0 <= row["ci_high"]
        assert not row["excludes_zero"] and row["wilcoxon_p"] == 1.0 and row["frac_genes_a_better"] == 0
        assert row["method_a"] != row["method_b"]  # same method name: labels still tell them apart


def _loop_spot_deltas(a, b, n_boot, seed):
    """The spot bootstrap written plainly: one replicate at a time, scored with score_predictions."""
    rng = np.random.default_rng(seed)
    per_rep = np.zeros((n_boot, 2, len(LAYOUT)))
    for f, (_, sections) in enumerate(sorted(LAYOUT.items())):
        slide = np.zeros((n_boot, 2, len(sections)))
        for k, section in enumerate(sorted(sections)):
            obs = a.attrs["predictions"][section]["observed"]
            draws = rng.integers(0, obs.shape[0], size=(n_boot, obs.shape[0]))
            for r in range(n_boot):
                for m, res in enumerate((a, b)):
                    pred = res.attrs["predictions"][section]["predicted"]
                    slide[r, m, k] = score_predictions(pred[draws[r]], obs[draws[r]], GENES).summary["pcc_a"]
        per_rep[:, :, f] = slide.mean(axis=2)
    means = per_rep.mean(axis=2)
    return means[:, 0] - means[:, 1]


def test_spot_bootstrap_matches_a_loop_and_is_seeded(good_bad, monkeypatch):
    import genedml_sd.tl._compare as cmp

    a, b = good_bad
    deltas = _loop_spot_deltas(a, b, 20, seed=3)
    lo, hi = np.percentile(deltas, [5, 95])
    row = gd.tl.compare_methods(a, b, n_boot=20, seed=3, confidence=0.9).iloc[0]
    assert row["ci_method"] == "spots" and row["n_boot"] == 20
    assert row["ci_low"] == pytest.approx(lo, abs=1e-10) and row["ci_high"] == pytest.approx(hi, abs=1e-10)
    # the sparse gene is constant in some replicates and must drop out there, as in the loop
    obs = a.attrs["predictions"]["S0"]["observed"][:, 0]
    assert (obs != 0).sum() == 2
    # drawing replicates in blocks gives the same stream
    monkeypatch.setattr(cmp, "_CHUNK", 100)
    again = gd.tl.compare_methods(a, b, n_boot=20, seed=3, confidence=0.9).iloc[0]
    assert (again["ci_low"], again["ci_high"]) == (row["ci_low"], row["ci_high"])
    other = gd.tl.compare_methods(a, b, n_boot=20, seed=4, confidence=0.9).iloc[0]
    assert (other["ci_low"], other["ci_high"]) != (row["ci_low"], row["ci_high"])


def test_gene_bootstrap_matches_a_loop(good_bad):
    a, b = good_bad
    stripped = []
    for res in (a, b):
        c = res.copy()
        c.attrs = {k: v for k, v in res.attrs.items() if k != "predictions"}
        stripped.append(c)
    row = gd.tl.compare_methods(*stripped, n_boot=25, seed=1).iloc[0]
    assert row["ci_method"] == "genes"
    with pytest.raises(ValueError, match="keep_predictions=True"):
        gd.tl.compare_methods(*stripped, n_boot=5, resample="spots")

    rng = np.random.default_rng(1)
    pg = [res.attrs["per_gene"].set_index(["fold", "section", "gene"]) for res in (a, b)]
    fold_means = np.zeros((25, 2, len(LAYOUT)))
    for f, (fold, sections) in enumerate(sorted(LAYOUT.items())):
        draws = rng.integers(0, len(GENES), size=(25, len(GENES)))
        for r in range(25):
            genes = [GENES[j] for j in draws[r]]
            for m in range(2):
                means = []
                for section in sorted(sections):
                    t = pg[m].loc[[(fold, section, g) for g in genes]]
                    means.append(t.loc[~t["constant"], "pcc"].mean())
                fold_means[r, m, f] = np.mean(means)
    overall = fold_means.mean(axis=2)
    lo, hi = np.percentile(overall[:, 0] - overall[:, 1], [2.5, 97.5])
    assert row["ci_low"] == pytest.approx(lo, abs=1e-12) and row["ci_high"] == pytest.approx(hi, abs=1e-12)


def test_dict_of_methods_compares_every_pair(observed, good_bad):
    a, b = good_bad
    c = _fake_cv("mid", _noisy(observed, 1.0, 5), observed, keep=False)
    res = gd.tl.compare_methods({"good": a, "bad": b, "mid": c}, n_boot=30)
    assert list(zip(res["method_a"], res["method_b"], strict=True)) == [
        ("good", "bad"),
        ("good", "mid"),
        ("bad", "mid"),
    ]
    assert list(res["ci_method"]) == ["spots", "genes", "genes"]
    assert res.loc[2, "delta_pcc_a"] == pytest.approx(_mean_pcc(b) - _mean_pcc(c), abs=1e-12)
    custom = gd.tl.compare_methods(a, b, labels=("A", "B"), n_boot=5)
    assert (custom.loc[0, "method_a"], custom.loc[0, "method_b"]) == ("A", "B")
    with pytest.raises(ValueError, match="leave out b"):
        gd.tl.compare_methods({"good": a, "bad": b}, b, n_boot=5)


def _with_per_gene(res, per_gene):
    out = res.copy()
    out.attrs = {**res.attrs, "per_gene": per_gene}
    return out


def test_mismatched_results_raise_naming_the_difference(good_bad):
    a, b = good_bad
    pg = b.attrs["per_gene"]
    fewer_folds = _with_per_gene(b, pg[pg["fold"] != 2])
    with pytest.raises(ValueError, match=r"folds \[0, 1, 2\].*folds \[0, 1\]"):
        gd.tl.compare_methods(a, fewer_folds)
    moved = pg.copy()
    moved.loc[moved["section"] == "S1b", "section"] = "S9"
    with pytest.raises(ValueError, match=r"Fold 1 .*'S1b'.*'S9'"):
        gd.tl.compare_methods(a, _with_per_gene(b, moved))
    renamed = pg.copy()
    renamed.loc[(renamed["section"] == "S2") & (renamed["gene"] == "g3"), "gene"] = "ERBB2"
    with pytest.raises(ValueError, match=r"Fold 2, section 'S2'.*g3.*ERBB2"):
        gd.tl.compare_methods(a, _with_per_gene(b, renamed))
    old = b.copy()
    old.attrs = {k: v for k, v in b.attrs.items() if k != "per_gene"}
    with pytest.raises(ValueError, match="rerun cross_validate"):
        gd.tl.compare_methods(a, old)
    other_obs = b.copy()
    preds = {s: dict(v) for s, v in b.attrs["predictions"].items()}
    preds["S0"]["observed"] = preds["S0"]["observed"] + 1
    other_obs.attrs = {**b.attrs, "predictions": preds}
    with pytest.raises(ValueError, match="'S0': the observed expression"):
        gd.tl.compare_methods(a, other_obs)
    with pytest.raises(ValueError, match="confidence"):
        gd.tl.compare_methods(a, b, confidence=95)
    with pytest.raises(TypeError, match="two cross_validate results"):
        gd.tl.compare_methods(a)


@pytest.fixture(scope="module")
def real_cv(demo):
    b4, c2, c3, _ = demo
    common = {"encoder": ENCODER, "genes": 20, "feature_mode": "spot", "keep_predictions": True, "seed": 0}
    ridge = gd.tl.cross_validate([b4, c2, c3], method="ridge", **common)
    mlp = gd.tl.cross_validate([b4, c2, c3], method="mlp", max_epochs=3, batch_size=128, **common)
    return ridge, mlp


def test_cross_validate_keeps_per_gene_scores_and_predictions(real_cv):
    for res in real_cv:
        folds = res[~res["fold"].isin(["mean", "sd"])]
        pg = res.attrs["per_gene"]
        assert list(pg.columns) == ["fold", "test_group", "section", "gene", "pcc", "constant"]
        assert pg["constant"].dtype == bool and pg["pcc"].dtype == np.float64
        assert sorted(pg["section"].unique()) == ["B4", "C2", "C3"]
        valid = pg[~pg["constant"] & pg["pcc"].notna()]
        per_fold = valid.groupby(["fold", "section"])["pcc"].mean().groupby(level="fold").mean()
        np.testing.assert_allclose(per_fold.to_numpy(), folds["pcc_a"].to_numpy(float), atol=1e-12)
        assert "best_epoch" in res.columns and list(res.columns).index("best_epoch") == 1 + list(res.columns).index(
            "epochs"
        )
        # predictions: the arrays the per-gene PCCs were computed from
        preds = res.attrs["predictions"]
        assert set(preds) == {"B4", "C2", "C3"}
        for section, entry in preds.items():
            assert entry["predicted"].dtype == np.float32 and entry["observed"].shape == entry["predicted"].shape
            assert entry["predicted"].shape[1] == len(entry["genes"]) == 20
            direct = gd.tl.per_gene_pearson(entry["predicted"], entry["observed"], entry["genes"])["pcc"]
            stored = pg[pg["section"] == section].set_index("gene")["pcc"].loc[entry["genes"]]
            np.testing.assert_allclose(stored.to_numpy(), direct.to_numpy(), atol=1e-5, equal_nan=True)
    ridge, mlp = real_cv
    assert (ridge.loc[~ridge["fold"].isin(["mean", "sd"]), "best_epoch"] == 0).all()  # closed form
    # fold B trains on C2, C3 (no validation section): no epoch was selected
    assert np.isnan(float(mlp.loc[0, "best_epoch"])) and mlp.loc[0, "epochs"] == 3
    assert np.isnan(float(mlp.loc[0, "val_pcc_a"]))  # and no validation score


def test_compare_methods_on_real_cross_validation(real_cv):
    ridge, mlp = real_cv
    row = gd.tl.compare_methods(ridge, mlp, n_boot=100).iloc[0]
    assert (row["method_a"], row["method_b"], row["ci_method"]) == ("ridge", "mlp", "spots")
    assert row["delta_pcc_a"] == pytest.approx(_mean_pcc(ridge) - _mean_pcc(mlp), abs=1e-12)
    assert row["ci_low"] <= row["ci_high"] and row["n_folds"] == 2 and 0 <= row["wilcoxon_p"] <= 1


def test_resampled_pearson_drops_constant_draws_like_per_gene_pearson():
    from genedml_sd.tl._compare import _resampled_pearson

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(30, 4))
    obs[:, 0] = 0.0
    obs[[3, 17], 0] = 1.3  # present in few spots: many replicates draw neither
    pred = obs + rng.normal(size=obs.shape)
    pred[:, 2] = 0.5  # a constant prediction: undefined in every replicate
    constant = np.ptp(obs, axis=0) == 0
    (got,) = _resampled_pearson(obs, [pred], constant, 60, np.random.default_rng(7))
    draws = np.random.default_rng(7).integers(0, 30, size=(60, 30))
    want = np.stack([gd.tl.per_gene_pearson(pred[d], obs[d], list("abcd"))["pcc"].to_numpy() for d in draws])
    want[np.array([np.ptp(obs[d], axis=0) == 0 for d in draws])] = np.nan
    np.testing.assert_allclose(got, want, atol=1e-10, equal_nan=True)
    assert 0 < np.isnan(got[:, 0]).sum() < 60 and np.isnan(got[:, 2]).all() and np.isfinite(got[:, [1, 3]]).all()


def test_cross_validate_reports_the_validation_pcc_of_each_fold(demo):
    """``val_pcc_a``: the fold model's mean per-gene PCC on its validation section, as a direct evaluation gives it."""
    b4, c2, c3, _ = demo
    common = {"encoder": ENCODER, "genes": 20, "feature_mode": "spot", "seed": 0, "method": "ridge"}
    res = gd.tl.cross_validate([b4, c2, c3], groups="section", val_sections=1, **common)
    fold_b = res[res["test_group"] == "B4"].iloc[0]  # trains on C2, C3 and validates on one of them
    val_name = fold_b["validation_sections"]
    assert val_name in ("C2", "C3")
    model = gd.tl.fit([c2, c3], val_sections=1, **common)
    assert model.training["validation_sections"] == [val_name]
    val_sdata = {"C2": c2, "C3": c3}[val_name]
    gd.tl.predict(val_sdata, model, key_added="val_pred", overwrite=True)
    direct = gd.tl.evaluate(val_sdata, pred_key="val_pred", inplace=False).summary["pcc_a"]
    del val_sdata.tables["val_pred"]
    assert fold_b["val_pcc_a"] == pytest.approx(direct, abs=1e-4)
    assert fold_b["val_pcc_a"] != pytest.approx(fold_b["pcc_a"], abs=1e-6)  # not the test score
    folds = res[~res["fold"].isin(["mean", "sd"])]
    assert res[res["fold"] == "mean"].iloc[0]["val_pcc_a"] == pytest.approx(folds["val_pcc_a"].mean())
