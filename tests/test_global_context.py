"""Bounded slide-level context of Gene-DML's global branch, and neighbour tokens gathered from a lattice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml_sd.model import (
    GeneDML,
    GeneDMLConfig,
    SlideContext,
    SlideTensors,
    TokenGrid,
    fixed_context_rows,
    sample_context_rows,
)


def _cfg(**kw):
    base = {"enc_dim": 12, "n_genes": 7, "dim": 32, "n_heads": 4, "gene_hidden": 16, "group_dim": 8, "k": 3}
    return GeneDMLConfig(**{**base, **kw})


def _slide(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.rand(n, 2, generator=g) * 3000


def _exact_over(model, local, xy, rows, centre):
    """Exact self-attention of the global blocks over the spots ``rows`` only, centred on ``centre``."""
    x = model.global_embedding(local[rows], xy[rows], centre).unsqueeze(0)
    for blk in model.global_blocks:
        x = blk(x)
    return model.global_proj(model.global_norm(x[0]))


def test_small_slides_get_the_exact_attention_bit_for_bit():
    model = GeneDML(_cfg(context_size=64)).eval()
    exact = GeneDML(_cfg(context_size=None)).eval()
    exact.load_state_dict(model.state_dict())
    local, xy = _slide(64)
    rows = torch.tensor([0, 5, 63])
    ref = exact.encode_global(local, xy)
    assert torch.equal(model.global_rows(local, xy, rows), ref[rows])
    ctx = model.encode_slide(local, xy)
    assert isinstance(ctx, torch.Tensor) and torch.equal(ctx, ref)


def test_prediction_context_rows_match_the_attention_over_the_context():
    model = GeneDML(_cfg(context_size=40, global_depth=2)).eval()
    local, xy = _slide(300)
    ctx = model.encode_slide(local, xy)
    assert isinstance(ctx, SlideContext) and ctx.shape == (300, 32)
    rows = fixed_context_rows(300, 40)
    assert len(rows) == 40 and len(set(rows.tolist())) == 40 and torch.equal(rows, fixed_context_rows(300, 40))
    with torch.no_grad():
        full = torch.cat([ctx[s : s + 64] for s in range(0, 300, 64)])
        ref = _exact_over(model, local, xy, rows, xy.mean(0))
    torch.testing.assert_close(full[rows], ref, atol=1e-5, rtol=1e-5)


def test_a_spot_outside_the_context_attends_to_the_context_and_itself():
    model = GeneDML(_cfg(context_size=30, global_depth=1)).eval()
    local, xy = _slide(200, seed=1)
    rows = fixed_context_rows(200, 30)
    outside = [i for i in range(200) if i not in set(rows.tolist())][:3]
    with torch.no_grad():
        got = model.encode_slide(local, xy)[:]
        for i in outside:
            # one block: the token of i over the set context + {i} is exactly its exact-attention row there
            ref = _exact_over(model, local, xy, torch.cat([rows, torch.tensor([i])]), xy.mean(0))[-1]
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
        # and it does not depend on the features of other spots outside the context
        other = outside[1]
        changed = local.clone()
        changed[other] += 5.0
        again = model.encode_slide(changed, xy)[:]
    torch.testing.assert_close(again[outside[0]], got[outside[0]], atol=1e-6, rtol=0)
    assert not torch.allclose(again[other], got[other])


def test_training_context_holds_the_batch_and_random_others():
    batch = torch.tensor([3, 10, 11, 50])
    ctx = sample_context_rows(batch, 1000, 64, torch.Generator().manual_seed(0))
    assert len(ctx) == 64 and torch.equal(ctx[:4], batch) and len(set(ctx.tolist())) == 64
    assert int(ctx.min()) >= 0 and int(ctx.max()) < 1000
    other = sample_context_rows(batch, 1000, 64, torch.Generator().manual_seed(1))
    assert set(ctx.tolist()) != set(other.tolist())
    # small slides: the whole complement; batch larger than the context: the batch itself
    assert sorted(sample_context_rows(torch.tensor([2, 5]), 8, 64).tolist()) == list(range(8))
    assert torch.equal(sample_context_rows(batch, 1000, 3), batch)

    model = GeneDML(_cfg(context_size=64)).eval()
    local, xy = _slide(1000)
    with torch.no_grad():
        got = model.global_rows(local, xy, batch, torch.Generator().manual_seed(0))
        ref = _exact_over(model, local, xy, ctx, xy.mean(0))[:4]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_training_with_a_bounded_context_learns():
    from genedml_sd.model import train_gene_dml

    rng = np.random.default_rng(0)
    w_img, w_gene = rng.normal(size=(4, 12)), rng.normal(size=(4, 7))
    slides = []
    for i, m in enumerate((256, 160)):
        z = rng.normal(size=(m, 4))
        local = z @ w_img + 0.1 * rng.normal(size=(m, 12))
        nb = local[:, None] + 0.3 * rng.normal(size=(m, 25, 12))
        slides.append(SlideTensors.from_numpy(local, rng.uniform(0, 4000, (m, 2)), nb, z @ w_gene, f"s{i}"))
    lit = train_gene_dml(
        slides[:1], slides[1:], _cfg(lr=1e-3, context_size=48), max_epochs=6, batch_size=32, seed=0, patience=20
    )
    hist = lit.history
    assert hist[-1]["train/total"] < 0.7 * hist[0]["train/total"]
    assert max(h["val/pcc"] for h in hist) > 0.6


def test_context_size_is_checked():
    with pytest.raises(ValueError, match="context_size"):
        _cfg(context_size=1)
    assert _cfg().context_size == 1024


def test_token_grid_gathers_like_the_dense_neighbour_tensor():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(9, 5)).astype(np.float32)
    index = rng.integers(0, 9, size=(6, 4))
    grid = TokenGrid(tokens, index)
    dense = tokens[index]
    assert grid.shape == (6, 4, 5) and grid.ndim == 3 and len(grid) == 6
    np.testing.assert_array_equal(grid[torch.tensor([4, 1])].numpy(), dense[[4, 1]])
    np.testing.assert_array_equal(grid[np.array([2])].numpy(), dense[[2]])
    np.testing.assert_array_equal(grid[1:3].numpy(), dense[1:3])
    np.testing.assert_array_equal(grid.dense().numpy(), dense)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        TokenGrid(tokens, index + 9)

    # a model predicts the same from the token grid as from the gathered tensor
    model = GeneDML(_cfg(enc_dim=5, n_neighbours=4, use_global=False)).eval()
    local = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    xy = torch.rand(6, 2)
    a = model.predict_slide(local, xy, grid, batch_size=4)
    b = model.predict_slide(local, xy, torch.from_numpy(dense), batch_size=4)
    torch.testing.assert_close(a, b)
    slide = SlideTensors.from_numpy(local.numpy(), xy.numpy(), grid, rng.normal(size=(6, 7)))
    assert slide.neighbour is grid


def test_identical_neighbour_grids_are_encoded_once_in_eval_with_the_same_result():
    model = GeneDML(_cfg(enc_dim=5, n_neighbours=4)).eval()
    rng = np.random.default_rng(1)
    grids = torch.from_numpy(rng.normal(size=(3, 4, 5)).astype(np.float32))
    batch = grids[torch.tensor([0, 1, 0, 2, 1, 0, 0, 2])]
    calls = []
    orig = model._encode_neighbour
    model._encode_neighbour = lambda x: calls.append(x.shape[0]) or orig(x)
    with torch.no_grad():
        got = model.encode_neighbour(batch)
        ref = orig(batch)
    assert calls == [3]  # three distinct grids in a batch of eight
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)

    # prediction order does not change the predictions
    local = torch.from_numpy(rng.normal(size=(8, 5)).astype(np.float32))
    xy = torch.rand(8, 2) * 1000
    order = np.array([3, 7, 0, 2, 5, 6, 1, 4])
    out = np.zeros((8, 7), dtype=np.float32)
    for rows, pred in model.iter_predictions(local, xy, batch, batch_size=3, order=order):
        out[rows] = pred.numpy()
    np.testing.assert_allclose(out, model.predict_slide(local, xy, batch, batch_size=3).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        next(model.iter_predictions(local, xy, batch, order=np.zeros(8, dtype=int)))
