"""Baselines (ridge on PCA, ST-Net-like MLP, BLEEP) on synthetic slides with a known linear structure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from genedml_sd.model import (
    BLEEP,
    RIDGE_ALPHAS,
    BLEEPConfig,
    MLPConfig,
    MLPRegressor,
    RidgeConfig,
    RidgeRegressor,
    TrainArgs,
    fit_ridge,
    get_method,
    train_method,
)
from genedml_sd.model._data import SlideTensors

D, G, LATENT = 12, 7, 4
FAST = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
BASELINES = ["bleep", "mlp", "ridge"]


def train_mlp(train, val, config, **kw):
    return train_method("mlp", train, val, config, TrainArgs(**kw))


def train_bleep(train, val, config, **kw):
    return train_method("bleep", train, val, config, TrainArgs(**kw))


def make_slides(seed: int = 0, n: int = 150, n_slides: int = 3, noise: float = 0.1) -> list[SlideTensors]:
    """Latent z (N, 4); features z W + noise (D=12); expression 2 + z V (G=7); 200 µm lattice."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(LATENT, D))
    v = rng.normal(size=(LATENT, G))
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 200.0
    slides = []
    for i in range(n_slides):
        z = rng.normal(size=(n, LATENT))
        local = z @ w + noise * rng.normal(size=(n, D))
        slides.append(SlideTensors.from_numpy(local, grid, expr=2.0 + z @ v, name=f"s{i}"))
    return slides


def shuffled(slides: list[SlideTensors], seed: int = 1) -> list[SlideTensors]:
    """The same slides with expression rows permuted within each slide (a no-signal control)."""
    g = torch.Generator().manual_seed(seed)
    return [
        SlideTensors(s.local, s.coords, None, s.expr[torch.randperm(s.n_spots, generator=g)], s.name) for s in slides
    ]


def pcc(pred: torch.Tensor, target: torch.Tensor) -> float:
    p = pred.double().numpy()
    t = target.double().numpy()
    return float(np.mean([np.corrcoef(p[:, j], t[:, j])[0, 1] for j in range(p.shape[1])]))


@pytest.fixture(scope="module")
def data():
    slides = make_slides()
    return slides[:2], slides[2:]


def _predict(model, slide, **kw):
    return model.predict_slide(slide.local, slide.coords, **kw)


def _roundtrip(model, cls, config):
    fresh = cls(type(config).from_dict(json.loads(json.dumps(config.to_dict()))))
    fresh.load_state_dict(model.state_dict())
    return fresh


# ----------------------------------------------------------------------------------------- interface
def test_baselines_import_only_torch_and_numpy():
    code = (
        "import sys, genedml_sd.model._ridge, genedml_sd.model._mlp, genedml_sd.model._bleep; "
        "bad = [k for k in ('spatialdata', 'anndata', 'lightning', 'sklearn', 'scipy', 'xarray') if k in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_configs_share_the_interface(name):
    base = get_method(name)
    cfg = base.config(enc_dim=D, n_genes=G)
    assert (cfg.use_local, cfg.use_neighbour, cfg.use_global) == (True, False, False)
    assert cfg.scales == ("local",)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert base.config.from_dict(d) == cfg
    with pytest.raises(TypeError, match="bogus"):
        base.config.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="local"):
        base.config(enc_dim=D, n_genes=G, use_neighbour=True)
    with pytest.raises(ValueError, match="enc_dim"):
        base.config(enc_dim=0, n_genes=G)
    module = base.module(cfg)
    assert isinstance(module, torch.nn.Module)
    assert module.feature_mean.shape == (D,)


def test_bleep_config_validation():
    with pytest.raises(ValueError, match="aggregate"):
        BLEEPConfig(enc_dim=D, n_genes=G, aggregate="median")
    with pytest.raises(ValueError, match="tau"):
        BLEEPConfig(enc_dim=D, n_genes=G, tau=0)
    with pytest.raises(ValueError, match="alpha"):
        RidgeConfig(enc_dim=D, n_genes=G, alpha=-1.0)


def test_training_rejects_mismatched_slides(data):
    train, val = data
    with pytest.raises(ValueError, match="expects"):
        fit_ridge(train, val, RidgeConfig(enc_dim=D + 1, n_genes=G))
    with pytest.raises(ValueError, match="No training"):
        fit_ridge([], val, RidgeConfig(enc_dim=D, n_genes=G))


# ----------------------------------------------------------------------------------------- ridge
def test_ridge_without_penalty_is_least_squares(data):
    train, val = data
    fit = fit_ridge(train, None, RidgeConfig(enc_dim=D, n_genes=G, n_components=D, alpha=0.0))
    assert fit.config.n_components == D and fit.config.alpha == 0.0
    x = torch.cat([s.local for s in train]).double().numpy()
    y = torch.cat([s.expr for s in train]).double().numpy()
    mean, std = x.mean(0), x.std(0, ddof=1)
    design = np.c_[(x - mean) / std, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    xv = val[0].local.double().numpy()
    expected = np.c_[(xv - mean) / std, np.ones(len(xv))] @ coef
    got = _predict(fit.module, val[0]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # training MSE in the history is the least-squares residual
    resid = ((design @ coef - y) ** 2).mean()
    assert fit.history[0]["train/total"] == pytest.approx(resid, rel=1e-6, abs=1e-9)


def test_ridge_chooses_alpha_on_validation_and_round_trips(data):
    train, val = data
    fit = fit_ridge(train, val, RidgeConfig(enc_dim=D, n_genes=G))
    assert fit.config.alpha in RIDGE_ALPHAS
    assert set(fit.alpha_scores) == set(RIDGE_ALPHAS)
    assert fit.alpha_scores[fit.config.alpha] == max(fit.alpha_scores.values())
    assert fit.config.n_components == D  # min(256, n_train, D)
    row = fit.history[0]
    assert {"train/total", "val/pcc", "val/mse", "alpha"} <= set(row)
    assert row["val/pcc"] > 0.9
    assert pcc(_predict(fit.module, val[0]), val[0].expr) == pytest.approx(row["val/pcc"], abs=1e-5)
    # heavy shrinkage is worse than the chosen penalty on this low-noise linear data
    assert fit.alpha_scores[1e4] < row["val/pcc"] - 0.1
    fresh = _roundtrip(fit.module, RidgeRegressor, fit.config)
    assert torch.equal(_predict(fresh, val[0]), _predict(fit.module, val[0]))


def test_ridge_pca_truncation_and_default_alpha(data):
    train, _ = data
    fit = fit_ridge(train, None, RidgeConfig(enc_dim=D, n_genes=G, n_components=3))
    n = sum(s.n_spots for s in train)
    assert fit.config.n_components == 3
    assert fit.config.alpha == pytest.approx(100 / (3 * G * n))
    comps = fit.module.components.double()
    np.testing.assert_allclose((comps.T @ comps).numpy(), np.eye(3), atol=1e-5)
    assert fit.module.weight.shape == (3, G)
    # the components are the leading eigenvectors of the training correlation matrix
    x = torch.cat([s.local for s in train]).double().numpy()
    evals, evecs = np.linalg.eigh(np.corrcoef(x, rowvar=False))
    top = evecs[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(top.T @ comps.numpy()), np.eye(3), atol=1e-4)
    again = fit_ridge(train, None, RidgeConfig(enc_dim=D, n_genes=G, n_components=3))
    assert torch.equal(again.module.components, fit.module.components)


# ----------------------------------------------------------------------------------------- mlp
@pytest.fixture(scope="module")
def mlp_fit(data):
    train, val = data
    cfg = MLPConfig(enc_dim=D, n_genes=G, hidden=64, lr=3e-3)
    return train_mlp(train, val, cfg, max_epochs=20, batch_size=64, seed=0, patience=20, **FAST)


def test_mlp_learns(mlp_fit, data):
    _, val = data
    hist = mlp_fit.history
    assert {"train/total", "val/pcc", "val/mse"} <= set(hist[0])
    losses = [h["train/total"] for h in hist]
    assert losses[-1] < 0.5 * losses[0]
    assert max(h["val/pcc"] for h in hist) > 0.6
    assert isinstance(mlp_fit.module, MLPRegressor)
    # the best epoch's weights are restored
    assert pcc(_predict(mlp_fit.module, val[0]), val[0].expr) == pytest.approx(
        max(h["val/pcc"] for h in hist), abs=1e-4
    )
    fresh = _roundtrip(mlp_fit.module, MLPRegressor, mlp_fit.config)
    assert torch.equal(_predict(fresh, val[0]), _predict(mlp_fit.module, val[0]))


def test_mlp_is_deterministic(data):
    train, val = data
    cfg = MLPConfig(enc_dim=D, n_genes=G, hidden=16, lr=1e-3)
    a = train_mlp(train, val, cfg, max_epochs=2, batch_size=64, seed=3, **FAST)
    b = train_mlp(train, val, cfg, max_epochs=2, batch_size=64, seed=3, **FAST)
    assert torch.equal(_predict(a.module, val[0]), _predict(b.module, val[0]))
    assert [h["train/total"] for h in a.history] == [h["train/total"] for h in b.history]


# ----------------------------------------------------------------------------------------- bleep
def test_bleep_retrieval_matches_hand_computation():
    cfg = BLEEPConfig(enc_dim=3, n_genes=2, dim=2, top_k=2, n_reference=4)
    model = BLEEP(cfg)
    ref_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    ref_expr = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    model.set_reference(ref_emb, ref_expr)
    # query (2, 0.5): cosines to the references 0.970, 0.243, -0.970, 0.858 -> nearest are #0 and #3
    query = torch.tensor([[2.0, 0.5], [-1.0, -0.2]])
    got = model.retrieve(query)
    expected_0 = (ref_expr[3] + ref_expr[0]) / 2
    # second query: cosines -0.981, -0.196, 0.981, -0.832 -> #2 and #1
    expected_1 = (ref_expr[2] + ref_expr[1]) / 2
    torch.testing.assert_close(got, torch.stack([expected_0, expected_1]))
    # weighted: softmax(cos / tau) over the two retrieved spots
    weighted = BLEEP(cfg.replace(aggregate="weighted", tau=0.5))
    weighted.set_reference(ref_emb, ref_expr)
    cos = torch.nn.functional.normalize(query[:1], dim=1) @ torch.nn.functional.normalize(ref_emb, dim=1).T
    w = torch.softmax(torch.stack([cos[0, 3], cos[0, 0]]) / 0.5, dim=0)
    torch.testing.assert_close(weighted.retrieve(query[:1])[0], w[0] * ref_expr[3] + w[1] * ref_expr[0])
    # top_k larger than the bank uses all references
    everything = BLEEP(cfg.replace(top_k=10))
    everything.set_reference(ref_emb, ref_expr)
    torch.testing.assert_close(everything.retrieve(query), ref_expr.mean(0).expand(2, -1))


def test_bleep_needs_a_reference_bank():
    model = BLEEP(BLEEPConfig(enc_dim=D, n_genes=G))
    with pytest.raises(RuntimeError, match="reference"):
        model.predict_slide(torch.zeros(3, D), torch.zeros(3, 2))


@pytest.fixture(scope="module")
def bleep_fit(data):
    train, val = data
    cfg = BLEEPConfig(enc_dim=D, n_genes=G, dim=32, top_k=10)
    return train_bleep(train, val, cfg, max_epochs=8, batch_size=64, seed=0, patience=8, **FAST)


def test_bleep_learns_and_predicts_alone(bleep_fit, data):
    train, val = data
    n_ref = sum(s.n_spots for s in train)
    assert bleep_fit.config.n_reference == n_ref
    assert bleep_fit.module.ref_expr.shape == (n_ref, G)
    torch.testing.assert_close(bleep_fit.module.ref_expr, torch.cat([s.expr for s in train]))
    hist = bleep_fit.history
    assert {"train/total", "train/instance", "val/pcc", "val/mse"} <= set(hist[0])
    assert hist[-1]["train/total"] < hist[0]["train/total"]
    best = max(h["val/pcc"] for h in hist)
    assert best > 0.5
    pred = _predict(bleep_fit.module, val[0])
    assert pcc(pred, val[0].expr) == pytest.approx(best, abs=1e-4)
    # chunked retrieval equals one big query
    torch.testing.assert_close(_predict(bleep_fit.module, val[0], batch_size=7), pred, rtol=0, atol=1e-6)
    # a module rebuilt from the (JSON) config predicts alone after load_state_dict
    fresh = _roundtrip(bleep_fit.module, BLEEP, bleep_fit.config)
    assert torch.equal(_predict(fresh, val[0]), pred)


# ----------------------------------------------------------------------------------------- controls
def test_baselines_beat_shuffled_labels(data, mlp_fit, bleep_fit):
    """Trained on expression rows permuted within slides, every baseline predicts ~nothing.

    With a 4-d latent, any fixed linear read-out correlates with the genes by chance (sd ~0.2), so the
    null is averaged over three shuffles / seeds and fitted without validation-based selection.
    """
    train, val = data
    real = {
        "ridge": fit_ridge(train, val, RidgeConfig(enc_dim=D, n_genes=G)).history[0]["val/pcc"],
        "mlp": pcc(_predict(mlp_fit.module, val[0]), val[0].expr),
        "bleep": pcc(_predict(bleep_fit.module, val[0]), val[0].expr),
    }
    null = {name: [] for name in real}
    for seed in range(3):
        noise = shuffled(train, seed)
        fits = {
            "ridge": fit_ridge(noise, None, RidgeConfig(enc_dim=D, n_genes=G, alpha=1.0)),
            "mlp": train_mlp(
                noise,
                None,
                MLPConfig(enc_dim=D, n_genes=G, hidden=64, lr=3e-3),
                max_epochs=4,
                batch_size=64,
                seed=seed,
                **FAST,
            ),
            "bleep": train_bleep(
                noise,
                None,
                BLEEPConfig(enc_dim=D, n_genes=G, dim=32, top_k=10),
                max_epochs=3,
                batch_size=64,
                seed=seed,
                **FAST,
            ),
        }
        for name, fit in fits.items():
            null[name].append(pcc(_predict(fit.module, val[0]), val[0].expr))
    for name, values in null.items():
        assert abs(np.mean(values)) < 0.25, (name, values)
        assert real[name] > np.mean(values) + 0.4, (name, real[name], values)
