"""Bad or unusual input to fit / predict / evaluate / saved models: clear errors, user data untouched."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import genedml_sd as gd

ENCODER = "stain-texture"


@pytest.fixture(scope="module")
def ridge(demo):
    _, c2, c3, _ = demo
    return gd.tl.fit([c2, c3], genes=30, encoder=ENCODER, method="ridge", val_sections=None, seed=0)


def _shallow(sdata, tables=None):
    import spatialdata as sd

    return sd.SpatialData(
        images=dict(sdata.images),
        shapes=dict(sdata.shapes),
        tables=dict(sdata.tables if tables is None else tables),
        attrs=dict(sdata.attrs),
    )


def test_fit_never_trains_on_prediction_tables(demo, ridge):
    _, c2, c3, c4 = demo
    with_pred = _shallow(c4)
    gd.tl.predict(with_pred, ridge, key_added="gd_predictions")
    # both present: the counts table is inferred, the prediction table skipped
    from genedml_sd.tl._data import resolve_slide_keys

    assert resolve_slide_keys(with_pred, None, None, None, need_table=True).table_key == "table"
    model = gd.tl.fit([c2, with_pred], genes=30, encoder=ENCODER, method="ridge", val_sections=None)
    assert model.training["sections"] == ["C2", "C4"]
    # only predictions present: an error that says why, nothing trained on predictions
    only_pred = _shallow(with_pred, {"gd_predictions": with_pred.tables["gd_predictions"]})
    with pytest.raises(KeyError, match="gd_predictions.*never used as counts"):
        gd.tl.fit([c2, only_pred], genes=30, encoder=ENCODER, method="ridge", val_sections=None)
    # naming a prediction table as the counts is refused too
    with pytest.raises(ValueError, match="holds predictions"):
        gd.tl.fit([with_pred], table_key="gd_predictions", genes=30, encoder=ENCODER, method="ridge")
    assert set(with_pred.tables) == {"table", "gd_predictions"}


def test_shapes_key_inferred_from_the_table_region_with_two_circle_elements(demo):
    from spatialdata.models import ShapesModel

    c4 = demo[3]
    two = _shallow(c4)
    grid = ShapesModel.parse(c4["C4_spots"].copy())  # keeps the element's transformations
    two.shapes["grid"] = grid  # a second circles element that no counts table annotates
    from genedml_sd.tl._data import resolve_slide_keys

    keys = resolve_slide_keys(two, None, None, None, need_table=True)
    assert (keys.shapes_key, keys.table_key) == ("C4_spots", "table")
    # a prediction table annotating the grid does not make the grid a counts element
    assert resolve_slide_keys(two, None, None, None, need_table=False).shapes_key == "C4_spots"


def test_evaluate_names_pred_key_when_the_prediction_table_is_missing(demo):
    with pytest.raises(KeyError, match="pred_key='nope'"):
        gd.tl.evaluate(demo[3], pred_key="nope")


def test_saved_model_records_version_and_checksum(ridge, tmp_path):
    folder = ridge.save(tmp_path / "m")
    meta = json.loads((folder / "genedml.json").read_text())
    assert meta["genedml_sd_version"] == gd.__version__
    import hashlib

    assert meta["weights_sha256"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    assert meta["features"]["mode"] == "spot" and meta["features"]["encoder"]["name"] == ENCODER
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same version: no warning
        loaded = gd.tl.TrainedModel.load(folder)
    assert loaded.genes == ridge.genes and loaded.features == ridge.features
    assert not list(folder.glob(".*.tmp"))  # temporary files renamed away


def test_damaged_saved_models_give_clear_errors(ridge, tmp_path):
    import shutil

    good = ridge.save(tmp_path / "good")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    truncated = copy("truncated_weights")
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.pt does not match the checksum"):
        gd.tl.TrainedModel.load(truncated)

    unrecorded = copy("truncated_no_checksum")  # an older save without a checksum: torch's error is wrapped
    meta = json.loads((unrecorded / "genedml.json").read_text())
    del meta["weights_sha256"]
    (unrecorded / "genedml.json").write_text(json.dumps(meta))
    (unrecorded / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot read the weights .*model.pt"):
        gd.tl.TrainedModel.load(unrecorded)

    bad_json = copy("truncated_json")
    text = (bad_json / "genedml.json").read_text()
    (bad_json / "genedml.json").write_text(text[: len(text) // 3])
    with pytest.raises(ValueError, match="genedml.json is not valid JSON"):
        gd.tl.TrainedModel.load(bad_json)

    genes = copy("wrong_genes")
    meta = json.loads((genes / "genedml.json").read_text())
    meta["genes"] = meta["genes"][:-1]
    (genes / "genedml.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lists 29 genes but the model's prediction head has width 30"):
        gd.tl.TrainedModel.load(genes)

    other = copy("other_version")
    meta = json.loads((other / "genedml.json").read_text())
    meta["genedml_sd_version"] = "9.9.0"
    (other / "genedml.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="written by genedml-sd 9.9.0"):
        gd.tl.TrainedModel.load(other)


def test_trained_model_keeps_its_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="renamed gd.tl.TrainedModel"):
        cls = gd.tl.GeneDML
    assert cls is gd.tl.TrainedModel


def test_predict_follows_the_feature_spec_of_the_model(ridge, demo):
    assert ridge.features.mode == "spot" and not ridge.features.neighbours
    table = gd.tl.predict(demo[3], ridge, inplace=False)
    assert table.uns["genedml_sd"]["feature_mode"] == "spot"
    assert table.uns["genedml_sd"]["kind"] == "predictions"
    np.testing.assert_array_equal(table.obs["spot_id"].to_numpy(), demo[3]["C4_spots"].index.to_numpy())


def test_fit_resumes_an_interrupted_run_to_the_same_model(demo, tmp_path):
    _, c2, c3, _ = demo
    kw = {"genes": 20, "encoder": ENCODER, "val_sections": None, "seed": 0, "batch_size": 128, "dim": 64}
    full = gd.tl.fit([c2, c3], max_epochs=4, **kw)
    part = gd.tl.fit([c2, c3], max_epochs=2, checkpoint_dir=tmp_path / "ckpt", **kw)
    assert len(part.history) == 2 and (tmp_path / "ckpt" / "last.ckpt").exists()
    resumed = gd.tl.fit([c2, c3], max_epochs=4, checkpoint_dir=tmp_path / "ckpt", resume=True, **kw)
    assert [h["train/total"] for h in resumed.history] == [h["train/total"] for h in full.history]
    for (name, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values(), strict=True):
        assert torch_equal(a, b), name
    with pytest.raises(ValueError, match="seed"):
        gd.tl.fit([c2, c3], max_epochs=4, checkpoint_dir=tmp_path / "ckpt", resume=True, **{**kw, "seed": 1})


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
