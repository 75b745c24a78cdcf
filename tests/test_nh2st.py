"""NH2ST: spot neighbourhoods, weighted contrastive loss, hypergraph convolution, module, training."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genedml_sd.model import TrainArgs, mean_gene_pcc, train_method
from genedml_sd.model._data import SlideTensors
from genedml_sd.model._nh2st import (
    NH2ST,
    CrossAttention,
    HypergraphEncoder,
    NH2STConfig,
    estimate_pitch,
    hypergraph_incidence,
    hypergraph_propagation,
    spot_neighbourhood,
    weighted_contrastive_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_nh2st_module_imports_only_torch_and_numpy():
    code = (
        "import sys, genedml_sd.model._nh2st as m; "
        "bad = [k for k in ('spatialdata', 'anndata', 'lightning', 'xarray', 'dask') if k in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------- neighbourhood
def _lattice_with_hole():
    """4 x 3 square lattice (200 µm) without position (1, 1); spot indices row-major:

    y=0:  0  1  2  3
    y=1:  4  .  5  6
    y=2:  7  8  9 10
    """
    pos = [(x, y) for y in range(3) for x in range(4) if (x, y) != (1, 1)]
    return np.array(pos, dtype=float) * 200.0


EXPECTED_0 = [  # corner spot (0, 0), radius 2, rows dy = -2..2, columns dx = -2..2
    [-1, -1, -1, -1, -1],
    [-1, -1, -1, -1, -1],
    [-1, -1, 0, 1, 2],
    [-1, -1, 4, -1, 5],
    [-1, -1, 7, 8, 9],
]
EXPECTED_5 = [  # spot at (2, 1), next to the hole
    [-1, -1, -1, -1, -1],
    [0, 1, 2, 3, -1],
    [4, -1, 5, 6, -1],
    [7, 8, 9, 10, -1],
    [-1, -1, -1, -1, -1],
]


def test_spot_neighbourhood_on_square_lattice_with_hole():
    xy = _lattice_with_hole()
    assert estimate_pitch(xy) == pytest.approx(200.0)
    assert estimate_pitch(xy, refine=0) == pytest.approx(200.0)  # the median nearest-neighbour distance
    nb = spot_neighbourhood(xy)
    assert nb.dtype == torch.int64 and nb.shape == (11, 25)
    assert nb[0].reshape(5, 5).tolist() == EXPECTED_0
    assert nb[5].reshape(5, 5).tolist() == EXPECTED_5
    assert torch.equal(nb[:, 12], torch.arange(11))  # centre slot = the spot itself
    # radius 1: 3x3, corner (3, 2)
    assert spot_neighbourhood(xy, 200.0, radius=1)[10].reshape(3, 3).tolist() == [[5, 6, -1], [9, 10, -1], [-1, -1, -1]]
    # the same with an explicit pitch, from a torch tensor, and after translation
    assert torch.equal(spot_neighbourhood(torch.from_numpy(xy).float() + 5432.1, 200.0), nb)


def test_spot_neighbourhood_is_robust_to_jitter_and_order():
    xy = _lattice_with_hole()
    ref = spot_neighbourhood(xy)
    rng = np.random.default_rng(0)
    for _ in range(5):
        jittered = xy + rng.uniform(-20, 20, xy.shape)  # ±10 % of the pitch
        assert estimate_pitch(jittered) == pytest.approx(200.0, rel=0.05)
        assert torch.equal(spot_neighbourhood(jittered), ref)
        assert torch.equal(spot_neighbourhood(jittered, 200.0), ref)
    # permuting the spots permutes rows and relabels indices consistently
    perm = rng.permutation(len(xy))
    inv = np.argsort(perm)
    got = spot_neighbourhood(xy[perm]).numpy()
    relabelled = np.where(got >= 0, perm[np.maximum(got, 0)], -1)
    np.testing.assert_array_equal(relabelled[inv], ref.numpy())


def test_spot_neighbourhood_hexagonal_and_edge_cases():
    # Visium-like hexagonal lattice: 100 µm pitch, rows sqrt(3)/2 pitch apart, odd rows shifted
    xy = np.array([[c * 100 + 50 * (r % 2), r * 100 * np.sqrt(3) / 2] for r in range(10) for c in range(10)])
    assert estimate_pitch(xy) == pytest.approx(100.0)
    nb = spot_neighbourhood(xy)
    inner = nb[55]  # row 5, column 5: all slots filled by distinct spots, no collisions
    assert (inner >= 0).all() and len(set(inner.tolist())) == 25
    assert inner.reshape(5, 5)[:, 2].tolist() == [35, 45, 55, 65, 75]
    # a single spot / no spots
    assert spot_neighbourhood(np.zeros((1, 2))).tolist() == [[-1] * 12 + [0] + [-1] * 12]
    assert spot_neighbourhood(np.zeros((0, 2))).shape == (0, 25)
    with pytest.raises(ValueError, match="pitch_um"):
        spot_neighbourhood(xy, pitch_um=0.0)


def test_spot_neighbourhood_scales_to_1e5_spots():
    side = 320
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    xy = np.stack([gx.ravel(), gy.ravel()], 1) * 200.0  # index = y * side + x
    t0 = time.perf_counter()
    nb = spot_neighbourhood(xy)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    i = 150 * side + 77
    expected = [i + dy * side + dx for dy in range(-2, 3) for dx in range(-2, 3)]
    assert nb[i].tolist() == expected
    assert (nb[0] >= 0).sum() == 9  # corner


# ------------------------------------------------------------------------------------------ loss
def _np_weighted_infonce(a, b, tau, w):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = a @ b.T / tau

    def one_side(s):
        e = np.exp(s)
        pos = np.diag(e)
        neg = e.sum(1) - pos
        return np.mean(-np.log(pos / (pos + w * neg)))

    return (one_side(s) + one_side(s.T)) / 2


def test_weighted_contrastive_loss_matches_hand_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    for tau, w in [(0.05, 0.1), (0.5, 0.3), (1.0, 1.0)]:
        got = weighted_contrastive_loss(ta, tb, tau, w).item()
        assert got == pytest.approx(_np_weighted_infonce(a, b, tau, w), rel=1e-4)
    # neg_weight = 1 is the standard symmetric InfoNCE (CLIP)
    logits = F.normalize(ta, dim=1) @ F.normalize(tb, dim=1).T / 0.2
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert weighted_contrastive_loss(ta, tb, 0.2, 1.0).item() == pytest.approx(clip.item(), rel=1e-6)
    # down-weighting negatives lowers the loss; matched pairs score lower than shuffled ones
    assert weighted_contrastive_loss(ta, tb, 0.2, 0.1) < weighted_contrastive_loss(ta, tb, 0.2, 1.0)
    assert weighted_contrastive_loss(ta, ta + 0.01, 0.05, 0.1) < weighted_contrastive_loss(ta, tb, 0.05, 0.1)
    with pytest.raises(ValueError, match="neg_weight"):
        weighted_contrastive_loss(ta, tb, 0.1, 0.0)


# ------------------------------------------------------------------------------------ hypergraph
def test_hypergraph_incidence_and_propagation_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.05], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    h = hypergraph_incidence(x, mask, top_k=1)[0]  # (nodes, hyperedges)
    # e0 = {0, 1}, e1 = {1, 0}, e2 = {2, 1}, e3 = {3, 2}; the missing node 4 is nowhere
    expected = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(h, expected)
    p = hypergraph_propagation(h[None])[0]
    hn = expected.numpy()
    dv, de = hn.sum(1), hn.sum(0)
    dvis = np.where(dv > 0, 1 / np.sqrt(np.maximum(dv, 1e-12)), 0)
    dei = np.where(de > 0, 1 / np.maximum(de, 1e-12), 0)
    ref = np.diag(dvis) @ hn @ np.diag(dei) @ hn.T @ np.diag(dvis)
    np.testing.assert_allclose(p.numpy(), ref, atol=1e-6)
    assert torch.equal(p, p.T)
    # top_k larger than the valid nodes: hyperedges just hold all valid nodes
    h_all = hypergraph_incidence(x, mask, top_k=10)[0]
    assert torch.equal(h_all[:4, :4], torch.ones(4, 4)) and h_all[4].sum() == 0 and h_all[:, 4].sum() == 0


def test_hypergraph_encoder_shape_and_masked_nodes_have_no_influence():
    torch.manual_seed(0)
    enc = HypergraphEncoder(16, n_layers=2, top_k=3, dropout=0.1).eval()
    x = torch.randn(3, 25, 16)
    mask = torch.rand(3, 25) > 0.3
    mask[:, 12] = True
    out = enc(x, mask)
    assert out.shape == (3, 25, 16)
    assert (out[~mask] == 0).all()
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    torch.testing.assert_close(enc(x2, mask), out)
    # a valid node's features do influence other valid nodes
    x3 = x.clone()
    x3[0, 12] += 1.0
    assert not torch.allclose(enc(x3, mask)[0][mask[0]], out[0][mask[0]])


def test_cross_attention_ignores_masked_keys():
    torch.manual_seed(0)
    ca = CrossAttention(16, 4, dropout=0.0).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = ca(x, y, mask)
    y2 = y.clone()
    y2[~mask] = 50.0
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(ca(x, y2, mask), out)


# ---------------------------------------------------------------------------------------- module
def _cfg(**kw):
    return NH2STConfig(**{"enc_dim": 12, "n_genes": 7, "dim": 32, "n_heads": 4, **kw})


def _batch(b=6, t=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    node_local, node_expr = torch.randn(b, t, 12, generator=g), torch.randn(b, t, 7, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, t // 2] = True
    return node_local[:, t // 2], node_expr[:, t // 2], node_local, node_expr, mask


def test_config_roundtrip_and_validation():
    cfg = _cfg(top_k=2, pitch_um=100.0)
    assert NH2STConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_nodes == 25 and cfg.scales == ("local",)
    assert cfg.use_local and not cfg.use_neighbour and not cfg.use_global
    assert "use_neighbour" not in cfg.to_dict()
    d = NH2STConfig(enc_dim=4, n_genes=3)
    assert (d.dim, d.top_k, d.tau, d.neg_weight, d.query_weight, d.neighbour_weight) == (512, 3, 0.05, 0.1, 1.0, 0.5)
    with pytest.raises(TypeError, match="bogus"):
        NH2STConfig.from_dict({"enc_dim": 4, "n_genes": 3, "bogus": 1})
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        _cfg(dim=30)
    with pytest.raises(ValueError, match="mse_weight"):
        _cfg(mse_weight=0.0)


def test_module_forward_loss_backward():
    torch.manual_seed(0)
    cfg = _cfg()
    model = NH2ST(cfg)
    local, expr, node_local, node_expr, mask = _batch()
    out = model(local)
    assert out["pred"].shape == (6, 7) and out["image"].shape == (6, 32)
    zi, zg = model.query_level(out["image"], model.gene_embedding(expr))
    assert zi.shape == zg.shape == (6, 32)
    ni, ng = model.neighbour_level(node_local, node_expr, mask)
    assert ni.shape == ng.shape == (6, 32)
    losses = model.loss(local, expr, node_local, node_expr, mask)
    assert set(losses) == {"total", "query", "neighbour", "mse"}
    expected = losses["query"] + 0.5 * losses["neighbour"] + losses["mse"]
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["total"].backward()
    for name in ("image_proj.weight", "gene_encoder.0.weight", "image_hypergraph.layers.0.theta.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # without the neighbour loss, neighbourhood inputs are not needed
    only_query = NH2ST(_cfg(neighbour_weight=0.0)).loss(local, expr)
    assert only_query["neighbour"].item() == 0.0 and torch.isfinite(only_query["total"])
    with pytest.raises(ValueError, match="node_local"):
        model.loss(local, expr)


def test_predict_slide_equals_batched_forward_and_output_bias():
    torch.manual_seed(0)
    model = NH2ST(_cfg())
    model.set_feature_stats(np.full(12, 0.5), np.full(12, 2.0))
    model.set_output_bias(np.arange(7.0))
    assert torch.equal(model.decoder[-1].bias, torch.arange(7.0))
    model.eval()
    n = 23
    local, xy = torch.randn(n, 12), torch.rand(n, 2) * 2000
    pred = model.predict_slide(local, xy, None, batch_size=5)
    assert pred.shape == (n, 7) and pred.dtype == torch.float32
    with torch.no_grad():
        ref = model(local)["pred"]
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.predict_slide(local, xy, torch.randn(n, 25, 12), batch_size=100), ref)
    assert model.predict_slide(torch.zeros(0, 12), torch.zeros(0, 2)).shape == (0, 7)
    other = NH2ST(_cfg())
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.feature_std, torch.full((12,), 2.0))


# -------------------------------------------------------------------------------------- training
def train_nh2st(train, val, config, **kw):
    return train_method("nh2st", train, val, config, TrainArgs(**kw))


def _synthetic_slides(seed=0, shapes=((12, 12), (12, 12), (12, 10))):
    """Slides on a 200 µm square lattice; expression and features are linear in shared latent factors."""
    rng = np.random.default_rng(seed)
    w_img, w_gene = rng.normal(size=(4, 12)), rng.normal(size=(4, 7))
    slides = []
    for i, (nx, ny) in enumerate(shapes):
        gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
        xy = np.stack([gx.ravel(), gy.ravel()], 1) * 200.0 + 1000.0 * i
        m = len(xy)
        z = rng.normal(size=(m, 4))
        local = z @ w_img + 0.1 * rng.normal(size=(m, 12))
        slides.append(SlideTensors.from_numpy(local, xy, None, z @ w_gene, f"s{i}"))
    return slides


def test_training_loss_falls_and_validation_learns():
    *train, val = _synthetic_slides()
    lit = train_nh2st(train, [val], _cfg(lr=1e-3), max_epochs=8, batch_size=48, seed=0, patience=20)
    hist = lit.history
    assert len(hist) == 8
    for key in ("train/total", "train/query", "train/neighbour", "train/mse", "val/pcc", "val/mse"):
        assert key in hist[0], key
    assert hist[-1]["train/total"] < 0.8 * hist[0]["train/total"]
    assert hist[-1]["train/mse"] < 0.75 * hist[0]["train/mse"]
    assert max(h["val/pcc"] for h in hist) > 0.5
    assert lit.best_epoch == int(np.argmax([h["val/pcc"] for h in hist]))
    assert isinstance(lit.module, NH2ST)
    # the neighbourhoods were computed once, on the lattice (interior spots have all 25 nodes)
    assert lit.contexts[0].shape == (144, 25) and (lit.contexts[0][5 * 12 + 5] >= 0).all()
    # the restored best model predicts the validation slide well
    pred = lit.module.eval().predict_slide(val.local, val.coords)
    assert mean_gene_pcc(pred, val.expr).item() == pytest.approx(max(h["val/pcc"] for h in hist), abs=1e-4)


def test_training_is_reproducible():
    slides = _synthetic_slides(shapes=((8, 8), (8, 8)))
    a = train_nh2st(slides, None, _cfg(), max_epochs=2, batch_size=32, seed=3)
    b = train_nh2st(slides, None, _cfg(), max_epochs=2, batch_size=32, seed=3)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    c = train_nh2st(slides, None, _cfg(), max_epochs=1, batch_size=32, seed=4)
    assert not torch.equal(a.module.image_proj.weight, c.module.image_proj.weight)
    bf16 = train_nh2st(slides, None, _cfg(), max_epochs=1, batch_size=32, seed=3, precision="bf16-mixed")
    assert np.isfinite(bf16.history[0]["train/total"])
    with pytest.raises(ValueError, match="expects 9 / 12"):
        train_nh2st(slides, None, _cfg(n_genes=9), max_epochs=1)
