"""Model layer: losses against hand computation, k-means, module shapes, training on tensors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from genedml_sd.model import (
    PRESETS,
    GeneDML,
    GeneDMLConfig,
    SlideTensors,
    SpotBatches,
    instance_group_loss,
    kmeans,
    multiscale_instance_loss,
    sinusoidal_position_encoding,
    soft_target_instance_loss,
)


def _np_softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_model_layer_imports_only_torch_and_numpy():
    code = (
        "import sys, genedml_sd.model as m; "
        "bad = [k for k in ('spatialdata', 'anndata', 'lightning', 'xarray', 'dask') if k in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------- losses
def test_soft_target_instance_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    gene = torch.tensor([[3.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    tau = 0.5
    i = image.numpy() / np.linalg.norm(image.numpy(), axis=1, keepdims=True)
    e = gene.numpy() / np.linalg.norm(gene.numpy(), axis=1, keepdims=True)
    targets = _np_softmax((i @ i.T + e @ e.T) / (2 * tau))
    logits = i @ e.T / tau
    ce_rows = -(targets * np.log(_np_softmax(logits))).sum(1).mean()
    ce_cols = -(targets.T * np.log(_np_softmax(logits.T))).sum(1).mean()
    expected = (ce_rows + ce_cols) / 2
    got = soft_target_instance_loss(image, gene, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the multi-scale loss is the mean over scales
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]])
    ms = multiscale_instance_loss([image, other], gene, tau)
    assert ms.item() == pytest.approx((got + soft_target_instance_loss(other, gene, tau)).item() / 2, rel=1e-6)


def test_instance_loss_lower_for_matching_pairs():
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    matched = soft_target_instance_loss(g + 0.01, g, 0.07)
    shuffled = soft_target_instance_loss(g[torch.randperm(16, generator=torch.Generator().manual_seed(1))], g, 0.07)
    assert matched < shuffled


def test_instance_group_loss_matches_hand_computation():
    # two obvious clusters in each modality; the image clusters are the gene clusters rotated by 90°
    gene = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    image = torch.tensor([[0.0, 1.0], [0.1, 1.0], [-1.0, 0.0], [-1.0, 0.1]])
    tau = 0.1
    loss, parts = instance_group_loss(image, gene, k=2, tau=tau, generator=torch.Generator().manual_seed(0))
    a_g, a_i = parts["gene_labels"].numpy(), parts["image_labels"].numpy()
    assert a_g[0] == a_g[1] != a_g[2] == a_g[3]
    assert a_i[0] == a_i[1] != a_i[2] == a_i[3]

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def centroids(x, labels):
        return unit(np.stack([unit(x)[labels == c].sum(0) for c in range(2)]))

    def ce(logits, labels):
        p = _np_softmax(logits)
        return -np.log(p[np.arange(len(labels)), labels]).mean()

    c_g, c_i = centroids(gene.numpy(), a_g), centroids(image.numpy(), a_i)
    expected = ce(unit(image) @ c_g.T / tau, a_g) + ce(unit(gene) @ c_i.T / tau, a_i)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3)
    x = torch.cat([c + 0.05 * torch.randn(20, 3, generator=gen) for c in centres])
    truth = np.repeat(np.arange(3), 20)
    cent, labels = kmeans(x, 3, generator=torch.Generator().manual_seed(3))
    assert cent.shape == (3, 3)
    np.testing.assert_allclose(cent.norm(dim=1).numpy(), 1.0, atol=1e-5)
    labels = labels.numpy()
    # same partition as the truth (up to label permutation)
    for c in range(3):
        assert len(set(labels[truth == c])) == 1
    assert len(set(labels)) == 3
    # k larger than the batch is clamped; gradients are not tracked
    y = torch.randn(4, 5, requires_grad=True)
    cent, labels = kmeans(y, 18)
    assert cent.shape == (4, 5) and not cent.requires_grad and labels.shape == (4,)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 3), 2)


# ---------------------------------------------------------------------------------------- modules
def _cfg(**kw):
    base = {"enc_dim": 12, "n_genes": 7, "dim": 32, "n_heads": 4, "gene_hidden": 16, "group_dim": 8, "k": 3}
    return GeneDMLConfig(**{**base, **kw})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_module_shapes_for_every_preset(preset):
    cfg = GeneDMLConfig.preset(preset, enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3)
    model = GeneDML(cfg)
    b, n = 5, 9
    local, nb = torch.randn(b, 12), torch.randn(b, 25, 12)
    glob = model.encode_global(torch.randn(n, 12), torch.rand(n, 2) * 1000)[:b] if cfg.use_global else None
    out = model(local, nb if cfg.use_neighbour else None, glob)
    assert out["pred"].shape == (b, 7)
    assert out["tokens"].shape == (b, len(cfg.scales), 32)
    if cfg.instance_loss or cfg.group_loss:
        assert model.gene_embedding(torch.randn(b, 7)).shape == (b, 32)
    else:  # no contrastive loss: no gene encoder to train (or to leave without gradients under DDP)
        with pytest.raises(RuntimeError, match="no gene encoder"):
            model.gene_embedding(torch.randn(b, 7))
    losses = model.loss(out, torch.randn(b, 7))
    assert set(losses) == {"total"} | {
        p for p, on in [("instance", cfg.instance_loss), ("group", cfg.group_loss), ("pred", True)] if on
    }
    expected_total = losses.get("instance", 0) + cfg.lam * losses.get("group", 0) + losses["pred"]
    assert losses["total"].item() == pytest.approx(float(expected_total.detach()), rel=1e-6)
    losses["total"].backward()
    assert model.head[-1].weight.grad is not None


def test_config_validation_and_roundtrip():
    cfg = GeneDMLConfig.preset("no-multiscale", enc_dim=4, n_genes=3, k=25, lam=0.5)
    assert cfg.scales == ("local",) and cfg.k == 25
    assert GeneDMLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="Unknown config preset 'nope'"):
        GeneDMLConfig.preset("nope", enc_dim=4, n_genes=3)
    with pytest.raises(TypeError, match="bogus"):
        GeneDMLConfig.from_dict({"enc_dim": 4, "n_genes": 3, "bogus": 1})
    with pytest.raises(ValueError, match="At least one of use_local"):
        GeneDMLConfig(enc_dim=4, n_genes=3, use_local=False, use_neighbour=False, use_global=False)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        GeneDMLConfig(enc_dim=4, n_genes=3, dim=30, n_heads=4)


def test_global_attention_chunked_equals_full_and_is_permutation_equivariant():
    torch.manual_seed(0)
    full = GeneDML(_cfg(attn_chunk=100_000)).eval()
    chunked = GeneDML(_cfg(attn_chunk=7)).eval()
    chunked.load_state_dict(full.state_dict())
    x, xy = torch.randn(50, 12), torch.rand(50, 2) * 3000
    a = full.encode_global(x, xy)
    b = chunked.encode_global(x, xy)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    perm = torch.randperm(50)
    torch.testing.assert_close(full.encode_global(x[perm], xy[perm]), a[perm], atol=1e-5, rtol=1e-5)
    # translation of the whole slide does not change anything (positions are centred)
    torch.testing.assert_close(full.encode_global(x, xy + 12345.0), a, atol=1e-4, rtol=1e-4)


def test_position_encoding_values():
    xy = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    pe = sinusoidal_position_encoding(xy, 8, 100.0, 1000.0)
    assert pe.shape == (2, 8)
    # centred x = -50, +50; shortest wavelength 100 µm -> angle ±pi
    np.testing.assert_allclose(pe[:, 0].numpy(), [np.sin(-np.pi), np.sin(np.pi)], atol=1e-5)
    np.testing.assert_allclose(pe[:, 4:].numpy(), [[0, 0, 1, 1], [0, 0, 1, 1]], atol=1e-6)  # y constant


def test_predict_slide_equals_batched_forward():
    torch.manual_seed(0)
    model = GeneDML(_cfg()).eval()
    n = 23
    local, nb, xy = torch.randn(n, 12), torch.randn(n, 25, 12), torch.rand(n, 2) * 2000
    pred = model.predict_slide(local, xy, nb, batch_size=5)
    with torch.no_grad():
        ref = model(local, nb, model.encode_global(local, xy))["pred"]
    assert pred.shape == (n, 7)
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=1e-5)


def test_feature_standardisation_is_part_of_the_state():
    model = GeneDML(_cfg())
    model.set_feature_stats(np.full(12, 3.0), np.full(12, 2.0))
    state = model.state_dict()
    assert torch.equal(state["feature_mean"], torch.full((12,), 3.0))
    other = GeneDML(_cfg())
    other.load_state_dict(state)
    assert torch.equal(other.feature_std, torch.full((12,), 2.0))


# ------------------------------------------------------------------------------------------- data
def test_spot_batches_cover_each_slide_once_per_epoch():
    ds = SpotBatches([10, 3, 7], batch_size=4, seed=1)
    assert len(ds) == 3 + 1 + 2
    seen = {0: [], 1: [], 2: []}
    for i in range(len(ds)):
        item = ds[i]
        seen[int(item["slide"])].extend(item["index"].tolist())
        assert len(item["index"]) <= 4
    assert {s: sorted(v) for s, v in seen.items()} == {0: list(range(10)), 1: list(range(3)), 2: list(range(7))}
    first = [ds[i]["index"].tolist() for i in range(len(ds))]
    ds.set_epoch(1)
    assert [ds[i]["index"].tolist() for i in range(len(ds))] != first
    ds.set_epoch(0)
    assert [ds[i]["index"].tolist() for i in range(len(ds))] == first
    with pytest.raises(ValueError, match="batch_size"):
        SpotBatches([5], batch_size=1)


def test_slide_tensors_checks_shapes_and_values():
    with pytest.raises(ValueError, match="coords must be"):
        SlideTensors.from_numpy(np.zeros((4, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        SlideTensors.from_numpy(np.zeros((2, 3)), np.zeros((2, 2)), expr=np.array([[1.0], [np.nan]]))


# --------------------------------------------------------------------------------------- training
def _synthetic_slides(seed=0, n=(160, 160, 120)):
    """Slides whose expression is a fixed linear function of latent factors that the features also carry."""
    rng = np.random.default_rng(seed)
    w_img, w_gene = rng.normal(size=(4, 12)), rng.normal(size=(4, 7))
    slides = []
    for i, m in enumerate(n):
        z = rng.normal(size=(m, 4))
        local = z @ w_img + 0.1 * rng.normal(size=(m, 12))
        nb = local[:, None] + 0.3 * rng.normal(size=(m, 25, 12))
        slides.append(SlideTensors.from_numpy(local, rng.uniform(0, 4000, (m, 2)), nb, z @ w_gene, f"s{i}"))
    return slides


def test_training_loss_falls_and_validation_learns():
    from genedml_sd.model import train_gene_dml

    *train, val = _synthetic_slides()
    lit = train_gene_dml(train, [val], _cfg(lr=1e-3), max_epochs=12, batch_size=64, seed=0, patience=20)
    hist = lit.history
    assert len(hist) == 12
    assert hist[-1]["train/total"] < 0.7 * hist[0]["train/total"]
    for part in ("train/instance", "train/group", "train/pred", "val/pcc"):
        assert part in hist[0]
    assert max(h["val/pcc"] for h in hist) > 0.6
    assert lit.best_epoch == int(np.argmax([h["val/pcc"] for h in hist]))


def test_training_is_reproducible_and_runs_in_bf16_autocast():
    from genedml_sd.model import train_gene_dml

    slides = _synthetic_slides(n=(64, 64))
    a = train_gene_dml(slides, None, _cfg(), max_epochs=2, batch_size=32, seed=3)
    b = train_gene_dml(slides, None, _cfg(), max_epochs=2, batch_size=32, seed=3)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    c = train_gene_dml(slides, None, _cfg(), max_epochs=1, batch_size=32, seed=3, precision="bf16-mixed")
    assert np.isfinite(c.history[0]["train/total"])


def test_training_rejects_mismatched_slides():
    from genedml_sd.model import train_gene_dml

    slides = _synthetic_slides(n=(20, 20))
    with pytest.raises(ValueError, match="expects 9 / 12"):
        train_gene_dml(slides, None, _cfg(n_genes=9), max_epochs=1)
    no_nb = SlideTensors(slides[0].local, slides[0].coords, None, slides[0].expr, "x")
    with pytest.raises(ValueError, match="no neighbour features"):
        train_gene_dml([no_nb], None, _cfg(), max_epochs=1)
