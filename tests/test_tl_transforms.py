"""Tile transforms (TTA, stain normalisation) through fit -> save -> load -> predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import genedml_sd as gd
from genedml_sd.encoders import _catalogue, fit_stain_normalizer, load_encoder

NAME = "colour-stats-tl-test"


class ColourStats(torch.nn.Module):
    """Per-channel mean and standard deviation of the normalised tile, (B, 6): cheap and not rotation-blind to stain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def registered():
    from genedml_sd.encoders import EncoderSpec, register_encoder

    spec = EncoderSpec(name=NAME, description="test", builder="custom", embed_dim=6, input_px=32)
    register_encoder(spec, builder=lambda spec, pretrained=False: ColourStats(), overwrite=True)
    yield NAME
    _catalogue._REGISTRY.pop(NAME, None)


def test_transforms_are_recorded_and_reapplied(demo, registered, tmp_path):
    from genedml_sd._spatial import get_pixel_size, spots_to_pixels
    from genedml_sd.tiling import SlideReader

    c2 = demo[1]
    image, spots = next(iter(c2.images)), next(k for k in c2.shapes if k.endswith("_spots"))
    centre = spots_to_pixels(c2, spots, image)[:1]
    ref_tile = SlideReader.from_sdata(c2, image).read_regions(centre, 150 * get_pixel_size(c2, image) / 0.5, 150)
    norm = fit_stain_normalizer(np.moveaxis(ref_tile[0], 0, -1), method="reinhard")

    kw = {"genes": 5, "max_epochs": 1, "val_sections": None, "dim": 32, "n_heads": 4, "pretrained": False}
    model = gd.tl.fit(c2, encoder=registered, tta="d4", stain_norm=norm, **kw)
    plain = load_encoder(registered, pretrained=False)
    assert model.encoder.tta == "d4" and model.encoder.stain_norm["method"] == "reinhard"
    assert model.encoder.fingerprint != plain.fingerprint

    model.save(tmp_path / "m")
    loaded = gd.tl.TrainedModel.load(tmp_path / "m")
    again = loaded.encoder.load()
    assert again.fingerprint == model.encoder.fingerprint  # the same transforms, rebuilt from the saved model
    tiles = torch.from_numpy(ref_tile)
    np.testing.assert_allclose(again(tiles).numpy(), plain.with_transforms(tta="d4", stain_norm=norm)(tiles).numpy())
    a = gd.tl.predict(c2, model, inplace=False).X
    b = gd.tl.predict(c2, loaded, inplace=False).X
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="fingerprint"):  # the plain encoder is not the one of training
        gd.tl.predict(c2, loaded, encoder=plain, inplace=False)


def test_a_raw_module_as_encoder_says_how_to_wrap_it(demo):
    with pytest.raises(TypeError, match="wrap_encoder"):
        gd.tl.fit(demo[1], encoder=ColourStats(), genes=5, max_epochs=1)
