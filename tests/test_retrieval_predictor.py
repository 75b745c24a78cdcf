"""Gene-DML's retrieval predictor: retrieval from the gene-aligned space, checked by hand and trained end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml_sd.model import GeneDML, GeneDMLConfig, SlideTensors, TrainArgs, train_method
from genedml_sd.model._retrieval import reference_rows, topk_mean_expression

CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
BASE = {"enc_dim": 12, "n_genes": 7, "dim": 32, "n_heads": 4, "gene_hidden": 16, "group_dim": 8, "k": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slides(n=(50, 40, 45), seed=0) -> list[SlideTensors]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 12))
    wg = rng.normal(size=(4, 7))
    out = []
    for i, m in enumerate(n):
        z = rng.normal(size=(m, 4))
        local = z @ w + 0.1 * rng.normal(size=(m, 12))
        nb = local[:, None] + 0.3 * rng.normal(size=(m, 25, 12))
        out.append(SlideTensors.from_numpy(local, rng.uniform(0, 2000, (m, 2)), nb, z @ wg, f"s{i}"))
    return out


def test_config_checks_and_bank_size():
    with pytest.raises(ValueError, match="predictor must be one of"):
        GeneDMLConfig(**BASE, predictor="knn")
    with pytest.raises(ValueError, match="needs instance_loss=True"):
        GeneDMLConfig(**BASE, predictor="retrieval", instance_loss=False)
    train = slides()
    assert GeneDMLConfig(**BASE, predictor="head").for_training(train).n_reference == 0
    assert GeneDMLConfig(**BASE).predictor == "auto" and GeneDMLConfig(**BASE).for_training(train).n_reference == 135
    # auto without the instance loss has no aligned space: no bank, and the head predicts
    no_instance = GeneDMLConfig(**BASE, instance_loss=False)
    assert not no_instance.retrieves and no_instance.for_training(train).n_reference == 0
    assert GeneDMLConfig(**BASE, predictor="blend").for_training(train).n_reference == 135
    assert GeneDMLConfig(**BASE, predictor="retrieval", reference_size=100).for_training(train).n_reference == 100
    rows = reference_rows(135, 100)
    assert rows.numel() == 100 and rows.unique().numel() == 100 and torch.equal(rows, rows.sort().values)
    assert torch.equal(reference_rows(135, 100), rows)  # seeded
    assert torch.equal(reference_rows(5, 10), torch.arange(5))


def test_topk_mean_expression_against_numpy():
    rng = np.random.default_rng(1)
    sims, ref = rng.normal(size=(4, 9)), rng.normal(size=(9, 3))
    got = topk_mean_expression(torch.tensor(sims), torch.tensor(ref), k=3).numpy()
    top = np.argsort(-sims, axis=1)[:, :3]
    np.testing.assert_allclose(got, ref[top].mean(axis=1), rtol=1e-5)
    w = np.exp(np.sort(sims, axis=1)[:, ::-1][:, :3] / 0.5)
    w /= w.sum(1, keepdims=True)
    weighted = topk_mean_expression(torch.tensor(sims), torch.tensor(ref), k=3, tau=0.5).numpy()
    np.testing.assert_allclose(weighted, (w[..., None] * ref[top]).sum(1), rtol=1e-5)


def test_retrieve_uses_the_mean_scale_cosine_to_the_gene_embeddings():
    cfg = GeneDMLConfig(**BASE, predictor="retrieval", top_k=2, n_reference=5)
    module = GeneDML(cfg).eval()
    g = torch.Generator().manual_seed(0)
    emb, expr = torch.randn(5, 32, generator=g), torch.randn(5, 7, generator=g)
    module.ref_embedding.copy_(torch.nn.functional.normalize(emb, dim=1))
    module.ref_expr.copy_(expr)
    tokens = torch.randn(3, 3, 32, generator=g)  # (B, S, dim)
    e = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    t = tokens.numpy() / np.linalg.norm(tokens.numpy(), axis=2, keepdims=True)
    sims = np.einsum("bsd,rd->bsr", t, e).mean(axis=1)
    top = np.argsort(-sims, axis=1)[:, :2]
    np.testing.assert_allclose(module.retrieve(tokens).numpy(), expr.numpy()[top].mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("predictor", ["retrieval", "blend"])
def test_trained_retrieval_predictor_predicts_from_the_bank_and_reloads(predictor):
    *train, val = slides(n=(50, 40, 45, 35))
    cfg = GeneDMLConfig(**BASE, predictor=predictor, top_k=5, lr=3e-3)
    res = train_method("gene-dml", train, [val], cfg, TrainArgs(max_epochs=6, batch_size=32, patience=6, **CPU))
    module = res.module
    assert res.config.n_reference == 135 and np.isfinite(res.history[-1]["val/pcc"])
    bank = torch.cat([s.expr for s in train])
    assert torch.equal(module.ref_expr, bank)
    # the bank's embeddings are those of the final weights
    with torch.no_grad():
        emb = torch.nn.functional.normalize(module.gene_embedding(bank), dim=1)
    torch.testing.assert_close(module.ref_embedding, emb)
    with torch.no_grad():
        pred = module.predict_slide(val.local, val.coords, val.neighbour)
        glob = module.encode_global(val.local, val.coords)
        out = module(val.local, val.neighbour, glob)
        retrieved = module.retrieve(out["tokens"])
    expect = retrieved if predictor == "retrieval" else (out["pred"] + retrieved) / 2
    torch.testing.assert_close(pred, expect)
    if predictor == "retrieval":  # every prediction is the mean of 5 training spots' expression
        sims = torch.nn.functional.normalize(out["tokens"], dim=-1).mean(1) @ module.ref_embedding.T
        idx = sims.topk(5, dim=1).indices
        torch.testing.assert_close(pred, bank[idx].mean(1))
    # rebuilt from its config and state dict, the module predicts the same
    again = GeneDML(GeneDMLConfig.from_dict(res.config.to_dict()))
    again.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval().predict_slide(val.local, val.coords, val.neighbour), pred)


def test_fit_with_mixed_batches_and_retrieval_saves_loads_and_predicts(demo, tmp_path):
    import genedml_sd as gd

    b4, c2, c3, _ = demo
    model = gd.tl.fit(
        [c2, c3],
        genes=20,
        encoder="stain-texture",
        max_epochs=2,
        val_sections=None,
        batch_size=128,
        dim=64,
        mix_slides=True,
        predictor="retrieval",
        top_k=10,
    )
    assert (
        model.training["mix_slides"] is True
        and model.config.n_reference == c2["C2_spots"].shape[0] + c3["C3_spots"].shape[0]
    )
    a = gd.tl.predict(b4, model, inplace=False)
    model.save(tmp_path / "m")
    b = gd.tl.predict(b4, gd.tl.TrainedModel.load(tmp_path / "m"), inplace=False)
    np.testing.assert_array_equal(a.X, b.X)
    # retrieval predicts means of 10 training spots: never beyond the training range of a gene
    lo = model.module.ref_expr.min(0).values.numpy()
    hi = model.module.ref_expr.max(0).values.numpy()
    assert (a.X >= lo - 1e-5).all() and (a.X <= hi + 1e-5).all()


@pytest.fixture(scope="module")
def auto_run():
    """Gene-DML with predictor="auto" trained on three slides, validated on a fourth."""
    *train, val = slides(n=(50, 40, 45, 35), seed=3)
    cfg = GeneDMLConfig(**BASE, predictor="auto", top_k=5, lr=3e-3)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_method("gene-dml", train, [val], cfg, TrainArgs(max_epochs=4, batch_size=32, patience=4, **CPU))
    finally:
        torch.set_num_threads(n)
    return res, val


def test_auto_predictor_keeps_the_best_on_validation_and_saves_that_choice(auto_run):
    from genedml_sd.model._losses import mean_gene_pcc

    res, val = auto_run
    chosen, scores = res.selection["predictor"], res.selection["scores"]
    assert res.config.predictor == chosen == res.module.config.predictor and set(scores) == {
        "head",
        "retrieval",
        "blend",
    }
    # each score is the validation PCC of that predictor, recomputed here with the same weights and bank
    for name, score in scores.items():
        again = GeneDML(GeneDMLConfig.from_dict({**res.config.to_dict(), "predictor": name}))
        again.load_state_dict(res.module.state_dict())
        with torch.no_grad():
            pred = again.eval().predict_slide(val.local, val.coords, val.neighbour)
        assert score == pytest.approx(float(mean_gene_pcc(pred, val.expr)), abs=1e-6)
    assert scores[chosen] == max(scores.values())
    # the saved config names the chosen predictor and keeps the bank, whichever was chosen
    rebuilt = GeneDML(GeneDMLConfig.from_dict(res.config.to_dict()))
    rebuilt.load_state_dict(res.module.state_dict())
    assert rebuilt.ref_expr.shape == (135, 7)


def test_auto_predictor_rules_without_validation_and_with_a_constant_head(auto_run):
    import copy

    from genedml_sd.model._retrieval import choose_predictor

    res, val = auto_run
    module = copy.deepcopy(res.module)
    assert choose_predictor(module, []) == {
        "predictor": "head",
        "scores": {},
        "source": "no validation slides: the head",
    }
    # a head that predicts a constant has no signal (PCC ~ 0); the blend then ranks spots exactly as the
    # retrieval does (a tie), and a tie keeps the earlier candidate: the retrieval
    module.config = module.config.replace(predictor="auto")
    with torch.no_grad():
        module.head[-1].weight.zero_()
    out = choose_predictor(module, [val])
    assert abs(out["scores"]["head"] or 0.0) < 1e-6 and out["scores"]["retrieval"] > 0.05
    assert out["scores"]["blend"] == pytest.approx(out["scores"]["retrieval"], abs=1e-6)
    assert out["predictor"] == "retrieval" == module.config.predictor


def test_fit_auto_records_the_choice_and_the_saved_model_predicts_with_it(demo, tmp_path):
    import genedml_sd as gd

    b4, c2, c3, _ = demo
    model = gd.tl.fit(
        [b4, c2, c3], genes=15, encoder="stain-texture", max_epochs=2, val_sections=["C3"], dim=64, predictor="auto"
    )
    sel = model.training["selection"]
    assert model.training["validation_sections"] == ["C3"] and sel["source"] == "validation sections (1)"
    assert sel["predictor"] == model.config.predictor != "auto" and set(sel["scores"]) == {"head", "retrieval", "blend"}
    model.save(tmp_path / "m")
    loaded = gd.tl.TrainedModel.load(tmp_path / "m")
    assert loaded.config.predictor == sel["predictor"] and loaded.training["selection"] == sel
    np.testing.assert_array_equal(gd.tl.predict(c3, model, inplace=False).X, gd.tl.predict(c3, loaded, inplace=False).X)


def test_a_model_saved_before_the_predictor_field_loads_with_the_head():
    old = GeneDMLConfig(**BASE, predictor="head").to_dict()
    del old["predictor"], old["top_k"], old["reference_size"], old["n_reference"]
    state = GeneDML(GeneDMLConfig.from_dict({**old, "predictor": "head"})).state_dict()
    assert not any(k.startswith("ref_") for k in state)
    cfg = GeneDMLConfig.from_saved(old)
    assert cfg.predictor == "head" and cfg.n_reference == 0
    GeneDML(cfg).load_state_dict(state)  # strict: the same buffers as when it was saved
    # a dict config without the field (presets, fit(config={...})) takes today's default
    assert (
        GeneDMLConfig.from_dict(old).predictor == "auto"
        and GeneDMLConfig.preset("no-group", **BASE).predictor == "auto"
    )
    # a saved choice is kept
    assert GeneDMLConfig.from_saved({**old, "predictor": "retrieval", "n_reference": 4}).predictor == "retrieval"


def test_auto_without_the_instance_loss_trains_and_predicts_with_the_head():
    *train, val = slides(n=(50, 40, 45, 35))
    cfg = GeneDMLConfig(**BASE, instance_loss=False)
    res = train_method("gene-dml", train, [val], cfg, TrainArgs(max_epochs=1, batch_size=32, **CPU))
    assert res.config.predictor == "head" and res.selection["predictor"] == "head" and not res.selection["scores"]
    assert "instance loss" in res.selection["source"] and not hasattr(res.module, "ref_expr")
