"""The distributed (DDP) training path, run on the CPU with two gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml_sd.model import GeneDML, SlideTensors, train_gene_dml


def _slides(seed=0, n=(96, 96, 64)):
    rng = np.random.default_rng(seed)
    w_img, w_gene = rng.normal(size=(4, 12)), rng.normal(size=(4, 7))
    out = []
    for i, m in enumerate(n):
        z = rng.normal(size=(m, 4))
        local = z @ w_img + 0.1 * rng.normal(size=(m, 12))
        nb = local[:, None] + 0.3 * rng.normal(size=(m, 25, 12))
        out.append(SlideTensors.from_numpy(local, rng.uniform(0, 4000, (m, 2)), nb, z @ w_gene, f"s{i}"))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", ["full", "no-group"])
def test_ddp_spawn_two_cpu_processes(preset):
    from genedml_sd.model import GeneDMLConfig

    cfg = GeneDMLConfig.preset(
        preset, enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3, lr=1e-3
    )
    *train, val = _slides()
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in GeneDML(cfg).state_dict().items()}
    lit = train_gene_dml(
        train, [val], cfg, max_epochs=2, batch_size=32, seed=0, accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    # the history written by rank 0 reaches the caller; the best weights are restored in this process
    assert [h["epoch"] for h in lit.history] == [0, 1]
    assert all(np.isfinite(h["train/total"]) and np.isfinite(h["val/pcc"]) for h in lit.history)
    assert lit.best_epoch in (0, 1)
    state = lit.module.state_dict()
    assert set(state) == set(init)
    assert any(not torch.equal(state[k], init[k]) for k in init)
    # a model without the group loss has no group heads (DDP would fail on parameters without gradients)
    assert ("image_group.weight" in state) == (preset == "full")
