"""Batches that mix slides: coverage, ordering, gathering, per-slide global context, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml_sd.model import (
    GeneDML,
    GeneDMLConfig,
    NH2STConfig,
    SlideTensors,
    SpotBatches,
    TrainArgs,
    train_method,
)
from genedml_sd.model._plan import TrainingPlan

CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slides(n=(40, 25, 31), seed=0) -> list[SlideTensors]:
    """Slides with a slide-specific feature offset; expression a linear function of the features."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, 7))
    out = []
    for i, m in enumerate(n):
        local = rng.normal(size=(m, 12)) + 2.0 * i
        nb = local[:, None] + 0.3 * rng.normal(size=(m, 25, 12))
        xy = rng.uniform(0, 2000, (m, 2))
        out.append(SlideTensors.from_numpy(local, xy, nb, local @ w * 0.3, f"s{i}"))
    return out


def test_mixed_batches_cover_every_spot_once_and_mix_slides():
    ds = SpotBatches([10, 3, 7], batch_size=4, seed=1, mix_slides=True)
    assert len(ds) == 5  # ceil(20 / 4): batches are drawn from all 20 spots together
    seen: set[tuple[int, int]] = set()
    n_mixed = 0
    for i in range(len(ds)):
        item = ds[i]
        ids, idx = item["slide"].numpy(), item["index"].numpy()
        assert ids.shape == idx.shape and len(idx) == 4
        pairs = list(zip(ids.tolist(), idx.tolist(), strict=True))
        assert pairs == sorted(pairs)  # ordered by slide, then index: one contiguous run per slide
        seen |= set(pairs)
        n_mixed += len(set(ids.tolist())) > 1
    assert seen == {(0, j) for j in range(10)} | {(1, j) for j in range(3)} | {(2, j) for j in range(7)}
    assert n_mixed >= 3  # 5 random batches of 4 from 3 slides: almost all mix
    first = [ds[i]["index"].tolist() for i in range(len(ds))]
    ds.set_epoch(1)
    assert [ds[i]["index"].tolist() for i in range(len(ds))] != first
    ds.set_epoch(0)
    assert [ds[i]["index"].tolist() for i in range(len(ds))] == first
    # the default stays one slide per batch, with a scalar slide id
    one = SpotBatches([10, 3, 7], batch_size=4, seed=1)
    assert all(one[i]["slide"].ndim == 0 for i in range(len(one)))


def test_gather_splits_a_mixed_batch_into_slide_parts():
    train = slides()
    cfg = GeneDMLConfig(enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3)
    plan = TrainingPlan(GeneDML(cfg), train, None, batch_size=32, seed=0, mix_slides=True)
    item = {"slide": torch.tensor([0, 0, 2, 2, 2]), "index": torch.tensor([3, 17, 0, 5, 30])}
    batch = plan.gather(item)
    assert batch.mixed and batch.size == 5
    assert [p.slide_index for p in batch.parts] == [0, 2]
    assert [(p.positions.start, p.positions.stop) for p in batch.parts] == [(0, 2), (2, 5)]
    assert torch.equal(batch.local[:2], train[0].local[[3, 17]])
    assert torch.equal(batch.local[2:], train[2].local[[0, 5, 30]])
    assert torch.equal(batch.expr[2:], train[2].expr[[0, 5, 30]])
    assert torch.equal(batch.neighbour[1], train[0].neighbour[17])
    with pytest.raises(ValueError, match=r"mixes 2 slides .*batch\.parts"):
        _ = batch.slide
    one = plan.gather({"slide": torch.tensor(1), "index": torch.tensor([2, 4])})
    assert not one.mixed and one.slide is train[1] and one.index.tolist() == [2, 4]


def test_global_branch_attends_within_each_spots_own_slide():
    """In a mixed batch, a spot's global token comes from its own slide only (exact attention over it)."""
    train = slides()
    cfg = GeneDMLConfig(enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3)
    module = GeneDML(cfg).eval()  # no dropout: tokens are deterministic
    module.prepare(train)
    plan = TrainingPlan(module, train, None, batch_size=32, mix_slides=True)
    batch = plan.gather({"slide": torch.tensor([0, 1, 1]), "index": torch.tensor([4, 0, 9])})
    seen = {}
    original = module.forward

    def capture(local, neighbour=None, global_tokens=None):
        seen["glob"] = global_tokens
        return original(local, neighbour, global_tokens)

    module.forward = capture  # type: ignore[method-assign]
    loss = module.training_loss(batch)
    assert torch.isfinite(loss.total)
    with torch.no_grad():
        expect0 = module.encode_global(train[0].local, train[0].coords)[[4]]
        expect1 = module.encode_global(train[1].local, train[1].coords)[[0, 9]]
    torch.testing.assert_close(seen["glob"], torch.cat([expect0, expect1]))
    # a different third slide changes nothing for spots of slides 0 and 1
    assert not torch.allclose(expect1, module.encode_global(train[2].local, train[2].coords)[[0, 9]].detach())


@pytest.mark.parametrize("method", ["gene-dml", "nh2st"])
def test_training_with_mixed_batches_lowers_the_loss(method):
    *train, val = slides(n=(60, 50, 40, 45))
    if method == "gene-dml":
        cfg = GeneDMLConfig(enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3, lr=3e-3)
    else:
        cfg = NH2STConfig(enc_dim=12, n_genes=7, dim=32, n_heads=4, pitch_um=200.0, lr=3e-3)
    args = TrainArgs(max_epochs=8, batch_size=32, patience=8, mix_slides=True, **CPU)
    res = train_method(method, train, [val], cfg, args)
    hist = res.history
    assert len(hist) == 8
    assert hist[-1]["train/total"] < hist[0]["train/total"]
    assert np.isfinite(hist[-1]["val/pcc"])
