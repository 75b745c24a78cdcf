"""The shared model-layer API: configs, modules, typed losses, training arguments, the method registry."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import genedml_sd.model._methods as methods_module
from genedml_sd.model import (
    GeneDML,
    GeneDMLConfig,
    LossOutput,
    MethodConfig,
    MethodSpec,
    MLPConfig,
    SlideModule,
    SlideTensors,
    SpotBatch,
    TrainArgs,
    TrainedConfig,
    TrainResult,
    get_method,
    list_methods,
    mean_gene_pcc,
    register_method,
    train_method,
)

D, G = 6, 4
CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def registry():
    """Restore the method registry after a test that registers methods."""
    saved = dict(methods_module._REGISTRY)
    yield
    methods_module._REGISTRY.clear()
    methods_module._REGISTRY.update(saved)


def linear_slides(seed: int = 0, n: int = 120, n_slides: int = 3) -> tuple[list[SlideTensors], np.ndarray, np.ndarray]:
    """Expression = 1 + features @ W + small noise; features D=6, genes G=4, on a 200 µm lattice."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, G))
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 200.0
    slides = []
    for i in range(n_slides):
        x = rng.normal(size=(n, D)) * 3.0 + 5.0
        slides.append(SlideTensors.from_numpy(x, xy, None, 1.0 + x @ w + 0.01 * rng.normal(size=(n, G)), f"s{i}"))
    return slides, w, xy


# ------------------------------------------------------------------------------- a method defined outside
@dataclasses.dataclass(frozen=True)
class LinearConfig(TrainedConfig):
    """A tiny linear head (defined here, as another package would)."""

    lr: float = 0.05
    init_scale: float = 0.0


class LinearHead(SlideModule):
    """``standardise(local) @ W^T + b``, trained with MSE."""

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(config.enc_dim, config.n_genes)
        with torch.no_grad():
            self.linear.weight.mul_(config.init_scale)

    @property
    def output_bias(self) -> torch.Tensor:
        return self.linear.bias

    def predict_batch(self, local, neighbour=None, slide_rows=None):
        return self.linear(self.standardise(local))

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        mse = torch.nn.functional.mse_loss(self.predict_batch(batch.local), batch.expr)
        return LossOutput(mse, {"mse": mse}, {"bias_mean": self.linear.bias.mean()})


def test_a_method_from_outside_trains_end_to_end(registry):
    spec = register_method("test-linear", config=LinearConfig, module=LinearHead, description="linear probe")
    assert isinstance(spec, MethodSpec) and get_method("test-linear") is spec and spec.fit is None
    assert "test-linear" in list_methods()
    *train, val = linear_slides()[0]
    cfg = LinearConfig(enc_dim=D, n_genes=G)
    res = train_method("test-linear", train, [val], cfg, TrainArgs(max_epochs=30, batch_size=40, patience=30, **CPU))
    assert isinstance(res, TrainResult) and isinstance(res.module, LinearHead) and not res.module.training
    hist = res.history
    assert len(hist) == 30 and [h["epoch"] for h in hist] == list(range(30))
    assert {"train/total", "train/mse", "train/bias_mean", "val/pcc", "val/mse", "lr"} <= set(hist[0])
    assert hist[0]["train/total"] == pytest.approx(hist[0]["train/mse"])
    assert hist[-1]["train/mse"] < 0.05 * hist[0]["train/mse"]
    assert max(h["val/pcc"] for h in hist) > 0.99
    assert res.best_epoch == int(np.argmax([h["val/pcc"] for h in hist]))
    # feature statistics are those of the training spots (float32 mean / unbiased std)
    x = torch.cat([s.local for s in train])
    torch.testing.assert_close(res.module.feature_mean, x.mean(0))
    torch.testing.assert_close(res.module.feature_std, x.std(0))
    # the prediction is the linear map of the standardised features, computed by hand
    w, b = res.module.linear.weight.detach(), res.module.linear.bias.detach()
    expected = ((val.local - x.mean(0)) / x.std(0)) @ w.T + b
    pred = res.module.predict_slide(val.local, val.coords, batch_size=7)
    torch.testing.assert_close(pred, expected, atol=1e-5, rtol=1e-5)
    assert mean_gene_pcc(pred, val.expr).item() == pytest.approx(hist[res.best_epoch]["val/pcc"], abs=1e-5)
    # save / load as gd.tl does it: config from the JSON dict, module from the config, weights
    d = json.loads(json.dumps(res.config.to_dict()))
    fresh = spec.module(spec.config.from_dict(d))
    fresh.load_state_dict(res.module.state_dict())
    assert torch.equal(fresh.predict_slide(val.local, val.coords, batch_size=7), pred)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_learning_rate_schedule_steps_per_epoch_or_per_optimiser_step(registry, interval):
    register_method("test-linear", config=LinearConfig, module=LinearHead)
    train = linear_slides(n=120, n_slides=2)[0]  # 2 slides x 3 batches of 40 spots: 6 optimiser steps per epoch
    cfg = LinearConfig(enc_dim=D, n_genes=G, step_size=4, gamma=0.5, lr_interval=interval)
    res = train_method("test-linear", train, None, cfg, TrainArgs(max_epochs=5, batch_size=40, **CPU))
    lrs = [h["lr"] for h in res.history]  # the rate after each epoch's last step
    if interval == "epoch":  # halved every 4 epochs: after epochs 0..4 the scheduler has stepped 1..5 times
        expected = [0.05 * 0.5 ** ((e + 1) // 4) for e in range(5)]
    else:  # halved every 4 optimiser steps: 6 (e + 1) steps after epoch e
        expected = [0.05 * 0.5 ** (6 * (e + 1) // 4) for e in range(5)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_interval must be 'epoch' or 'step', got 'batch'"):
        LinearConfig(enc_dim=D, n_genes=G, lr_interval="batch")


def test_register_method_errors(registry):
    register_method("test-linear", config=LinearConfig, module=LinearHead)
    with pytest.raises(ValueError, match="already registered"):
        register_method("test-linear", config=LinearConfig, module=LinearHead)
    again = register_method("test-linear", config=LinearConfig, module=LinearHead, overwrite=True, description="x")
    assert get_method("test-linear").description == "x" and again.description == "x"
    with pytest.raises(TypeError, match="MethodConfig subclass"):
        register_method("bad", config=dict, module=LinearHead)
    with pytest.raises(TypeError, match="SlideModule subclass"):
        register_method("bad", config=LinearConfig, module=nn.Linear)

    class NoLoss(SlideModule):
        def predict_batch(self, local, neighbour=None, slide_rows=None):
            return local

    with pytest.raises(TypeError, match="no training_loss"):
        register_method("bad", config=LinearConfig, module=NoLoss)
    # with its own solver a module needs no training_loss
    assert register_method("own-solver", config=LinearConfig, module=NoLoss, fit=lambda *a: None).fit is not None
    with pytest.raises(KeyError, match=r"Unknown method 'nope'; registered methods: \['gene-dml', 'nh2st'"):
        get_method("nope")
    assert "bad" not in list_methods()


def test_builtin_methods_and_config_kinds():
    assert list_methods()[:5] == ["gene-dml", "nh2st", "ridge", "mlp", "bleep"]
    for name in list_methods()[:5]:
        spec = get_method(name)
        assert issubclass(spec.config, MethodConfig) and issubclass(spec.module, SlideModule)
        assert (spec.fit is None) == (name != "ridge")
    slides = linear_slides(n=20, n_slides=2)[0]
    with pytest.raises(TypeError, match="needs a GeneDMLConfig, got MLPConfig"):
        train_method("gene-dml", slides, None, MLPConfig(enc_dim=D, n_genes=G))


def test_method_config_base():
    cfg = LinearConfig(enc_dim=D, n_genes=G)
    assert cfg.scales == ("local",) and not cfg.use_neighbour and not cfg.use_global
    assert [f.name for f in dataclasses.fields(cfg)][:2] == ["enc_dim", "n_genes"]
    assert cfg.to_dict() == {"enc_dim": D, "n_genes": G, "lr": 0.05, "weight_decay": 0.0, "step_size": 20,
                             "gamma": 0.95, "lr_interval": "epoch", "init_scale": 0.0}  # fmt: skip
    assert LinearConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.1).lr == 0.1 and cfg.lr == 0.05
    with pytest.raises(TypeError, match=r"Unknown LinearConfig fields: \['bogus', 'zzz'\]"):
        LinearConfig.from_dict({"enc_dim": D, "n_genes": G, "zzz": 1, "bogus": 2})
    with pytest.raises(ValueError, match="n_genes must be an integer >= 1"):
        LinearConfig(enc_dim=D, n_genes=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        LinearConfig(enc_dim=D, n_genes=G, lr=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    # Gene-DML declares the scale switches as fields; an old saved config (all fields) still loads
    old = {"enc_dim": 4, "n_genes": 3, "use_neighbour": False, "use_global": False, "lr": 1e-4, "k": 18}
    g = GeneDMLConfig.from_dict(old)
    assert g.scales == ("local",) and g.use_neighbour is False and g.lam == 0.8


def test_loss_output_is_a_typed_mapping():
    total, pred = torch.tensor(3.0), torch.tensor(2.0)
    out = LossOutput(total, {"pred": pred}, {"tau": torch.tensor(0.1)})
    assert list(out) == ["total", "pred"] and len(out) == 2 and out["pred"] is pred and out["total"] is total
    assert out.get("group", 0.0) == 0.0 and "tau" not in out
    assert list(out.logged()) == ["total", "pred", "tau"]
    with pytest.raises(ValueError, match="unique"):
        LossOutput(total, {"total": pred})
    with pytest.raises(ValueError, match="unique"):
        LossOutput(total, {"a": pred}, {"a": pred})


def test_train_args_validation():
    a = TrainArgs()
    assert (a.max_epochs, a.batch_size, a.seed, a.patience, a.checkpoint_dir, a.resume) == (
        100,
        256,
        0,
        10,
        None,
        False,
    )
    assert (a.accelerator, a.devices, a.strategy, a.precision, a.progress, a.trainer_kwargs) == (
        "auto", "auto", "auto", None, False, None)  # fmt: skip
    assert TrainArgs(checkpoint_dir="~/x").checkpoint_dir.is_absolute()
    for kw, match in [
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"max_epochs": 0}, "max_epochs must be an integer >= 1"),
        ({"max_epochs": 2.5}, "max_epochs"),
        ({"patience": -1}, "patience"),
        ({"seed": True}, "seed must be an integer"),
        ({"devices": 1.5}, "devices"),
        ({"progress": "yes"}, "progress must be True or False"),
        ({"resume": True}, r"resume=True\) needs checkpoint_dir"),
        ({"trainer_kwargs": {"max_epochs": 3, "logger": True}}, r"may not set \['logger', 'max_epochs'\]"),
        ({"trainer_kwargs": [1]}, "trainer_kwargs must be a dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainArgs(**kw)


def test_predict_slide_chunks_host_batches_and_restores_the_mode(tmp_path):
    torch.manual_seed(0)
    cfg = GeneDMLConfig(enc_dim=D, n_genes=G, dim=16, n_heads=2, gene_hidden=8, group_dim=4, k=2, dropout=0.5)
    model = GeneDML(cfg)
    model.set_feature_stats(np.full(D, 1.0), np.full(D, 2.0))
    n = 23
    local, xy = torch.randn(n, D), torch.rand(n, 2) * 2000
    nb = np.random.default_rng(0).normal(size=(n, 25, D)).astype(np.float32)
    path = tmp_path / "nb.npy"
    np.save(path, nb)
    memmap = np.load(path, mmap_mode="r")  # read-only: must be read chunk by chunk, never as a whole
    assert not memmap.flags.writeable
    model.train()
    a = model.predict_slide(local, xy, memmap, batch_size=5)
    assert model.training  # the mode is restored, and dropout was off while predicting
    b = model.predict_slide(local.numpy(), xy.numpy(), torch.from_numpy(nb), batch_size=100)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        ref = model(local, torch.from_numpy(nb), model.encode_global(local, xy))["pred"]
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"local_all must be \(N, 6\)"):
        model.predict_slide(torch.zeros(3, D + 1), torch.zeros(3, 2), memmap[:3])
    with pytest.raises(ValueError, match="reads neighbour features"):
        model.predict_slide(local, xy)


def test_mean_gene_pcc_against_numpy():
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    target[:, 2] = 1.0  # constant gene: skipped
    expected = np.mean([np.corrcoef(pred[:, j], target[:, j])[0, 1] for j in (0, 1, 3, 4)])
    got = mean_gene_pcc(torch.tensor(pred), torch.tensor(target)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert np.isnan(mean_gene_pcc(torch.ones(4, 2), torch.ones(4, 2)).item())


def test_progress_bar_shows_epochs_and_validation_pcc(capfd):
    *train, val = linear_slides(n=40)[0]
    cfg = MLPConfig(enc_dim=D, n_genes=G, hidden=8)
    train_method("mlp", train, [val], cfg, TrainArgs(max_epochs=2, batch_size=20, progress=False, **CPU))
    assert "val_pcc" not in capfd.readouterr().err
    train_method("mlp", train, [val], cfg, TrainArgs(max_epochs=2, batch_size=20, progress=True, **CPU))
    out = capfd.readouterr()
    err = out.err
    assert "2/2" in err and "val_pcc=" in err and "epoch" in err
    # the bar only: Lightning's device summary and tips appear at debug verbosity
    assert "GPU available" not in out.out + out.err and "litlogger" not in out.out + out.err


def test_extra_callbacks_from_trainer_kwargs_are_called():
    import lightning.pytorch as pl

    class Count(pl.Callback):
        epochs = 0

        def on_train_epoch_end(self, trainer, pl_module):
            Count.epochs += 1

    slides = linear_slides(n=40, n_slides=2)[0]
    args = TrainArgs(max_epochs=3, batch_size=20, trainer_kwargs={"callbacks": [Count()]}, **CPU)
    res = train_method("mlp", slides, None, MLPConfig(enc_dim=D, n_genes=G, hidden=8), args)
    assert Count.epochs == 3 and len(res.history) == 3 and res.best_epoch is None
