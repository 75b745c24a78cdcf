"""Tissue masks that reject black, grey and white background (``method="saturation"``, the default)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from genedml_sd._spatial import get_pixel_size, image_levels, set_pixel_size, spots_to_pixels

STRIP_PX = 600  # width of the pasted strips, demo B4 px (1.38 µm/px: about 830 µm)


def _affine(element, cs="global"):
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _mask_px(mask):
    """The mask's pixel as (x, y) scale0 px of an image with an Identity to global."""
    a = _affine(mask)
    return a[0, 0], a[1, 1]


def _values_at(mask, xy0):
    """Mask values at scale0 px positions (image with an Identity to global)."""
    a = np.linalg.inv(_affine(mask))
    q = np.floor(xy0 @ a[:2, :2].T + a[:2, 2]).astype(int)
    return np.asarray(mask.values)[q[:, 1], q[:, 0]]


def _strip_fraction(mask, x0, x1, y0, y1):
    """Fraction of the mask pixels whose centre lies in the scale0 px box [x0, x1) x [y0, y1)."""
    v = np.asarray(mask.values)
    sx, sy = _mask_px(mask)
    cx = (np.arange(v.shape[1]) + 0.5) * sx
    cy = (np.arange(v.shape[0]) + 0.5) * sy
    sel = v[np.ix_((cy >= y0) & (cy < y1), (cx >= x0) & (cx < x1))]
    assert sel.size > 100
    return float(sel.mean())


@pytest.fixture(scope="module")
def b4_strips(demo):
    """Demo B4 with a noisy black strip pasted on the right edge and a noisy grey strip on the top edge.

    Returns the SpatialData (image ``he`` with an Identity to global), the spot centres (scale0 px),
    and the strips as px boxes ``(x0, x1, y0, y1)``.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    b4 = demo[0]
    img = np.asarray(image_levels(b4["B4_he"])[0].transpose("y", "x", "c").values)
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    black = rng.integers(0, 30, size=(h, STRIP_PX, 3), dtype=np.uint8)  # out of the slide: black with sensor noise
    grey = rng.integers(94, 127, size=(STRIP_PX, w + STRIP_PX, 3), dtype=np.uint8)  # grey scanner background
    out = np.concatenate([grey, np.concatenate([img, black], axis=1)], axis=0).astype(np.uint8)
    el = Image2DModel.parse(
        out.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2, 2],
        chunks=(3, 1024, 1024),
        transformations={"global": Identity()},
    )
    sdata = SpatialData(images={"he": el})
    set_pixel_size(sdata, "he", get_pixel_size(b4, "B4_he"))
    spots = spots_to_pixels(b4, "B4_spots", "B4_he") + np.array([0.0, STRIP_PX])
    strips = {"black": (w, w + STRIP_PX, STRIP_PX, h + STRIP_PX), "grey": (0, w + STRIP_PX, 0, STRIP_PX)}
    return sdata, spots, strips


def test_saturation_mask_rejects_black_and_grey_strips(b4_strips):
    from genedml_sd.pp import tissue_mask

    sdata, spots, strips = b4_strips
    new = tissue_mask(sdata, "he", inplace=False)  # default: method="saturation"
    assert _values_at(new, spots).mean() >= 0.95
    for name, box in strips.items():
        assert _strip_fraction(new, *box) < 0.02, name

    old = tissue_mask(sdata, "he", method="otsu", inplace=False)  # optical density alone
    assert _strip_fraction(old, *strips["black"]) > 0.9
    assert _strip_fraction(old, *strips["grey"]) > 0.9


def test_saturation_mask_same_as_optical_density_on_glass(demo):
    """On a glass slide (white / tinted glass only) both detectors agree pixel for pixel but a few."""
    from spatialdata import SpatialData

    from genedml_sd.pp import tissue_mask

    b4 = demo[0]
    view = SpatialData(images={"B4_he": b4["B4_he"]})
    set_pixel_size(view, "B4_he", get_pixel_size(b4, "B4_he"))
    new = np.asarray(tissue_mask(view, "B4_he", inplace=False).values)
    old = np.asarray(tissue_mask(view, "B4_he", method="otsu", inplace=False).values)
    assert (new != old).mean() < 1e-3
    assert 0.3 < new.mean() < 0.8


def test_a1_black_background(her2st_root):
    """HER2ST A1 (the authors' image with everything outside the tissue set to black).

    The optical density alone calls the black background tissue and misses the tissue (its Otsu
    threshold lands between tissue and black); the default rejects the black and covers the spots.
    """
    import genedml_sd as gd
    from genedml_sd.pp import tissue_mask

    a1 = gd.io.her2st(her2st_root, "A1")
    spots = spots_to_pixels(a1, "A1_spots", "A1_he")
    img_to_global = _affine(a1["A1_he"])

    def covered(mask):
        a = np.linalg.inv(_affine(mask)) @ img_to_global  # scale0 px -> mask px
        q = np.floor(spots @ a[:2, :2].T + a[:2, 2]).astype(int)
        return np.asarray(mask.values)[q[:, 1], q[:, 0]].mean()

    new = tissue_mask(a1, "A1_he", inplace=False)
    old = tissue_mask(a1, "A1_he", method="otsu", inplace=False)
    assert covered(new) >= 0.98
    assert covered(old) < 0.2
    assert np.asarray(new.values).mean() < 0.45 < np.asarray(old.values).mean()


def test_background_kinds():
    from genedml_sd.pp._tissue import _background

    px = {
        "black": (12, 3, 25),  # noisy black: saturated, but dark
        "dark grey": (70, 70, 72),
        "grey": (128, 128, 128),
        "light grey glass": (215, 215, 215),
        "white": (255, 255, 255),
        "tinted white": (255, 235, 250),
        "eosin": (230, 150, 200),
        "haematoxylin": (90, 60, 140),
        "pale stroma": (225, 200, 225),
    }
    arr = np.array(list(px.values()), dtype=np.float64).T[:, None, :]  # (3, 1, n)
    kinds, population = _background(arr, 255.0)
    got = {name: [k for k, v in kinds.items() if v[0, i]] for i, name in enumerate(px)}
    assert got == {
        "black": ["black"],
        "dark grey": ["grey"],
        "grey": ["grey"],
        "light grey glass": ["grey"],
        "white": ["white"],
        "tinted white": ["white"],
        "eosin": [],
        "haematoxylin": [],
        "pale stroma": [],
    }
    # the threshold is estimated on glass and tissue: not on black nor on grey darker than glass
    assert population[0].tolist() == [False, False, False, True, True, True, True, True, True]


def _grey_sdata(value):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    img = np.full((1, 400, 400), value, dtype=np.uint8)
    img[0, 100:300, 120:320] = 90
    sdata = SpatialData(
        images={"g": Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": Identity()})}
    )
    set_pixel_size(sdata, "g", 2.0)
    return sdata


def test_single_channel_falls_back_to_optical_density(caplog):
    from genedml_sd.pp import tissue_mask

    sdata = _grey_sdata(245)
    with caplog.at_level(logging.WARNING, logger="genedml_sd.pp._tissue"):
        new = tissue_mask(sdata, "g", inplace=False)
    assert "single (grey) channel" in caplog.text and "'g'" in caplog.text
    old = tissue_mask(sdata, "g", method="otsu", inplace=False)
    np.testing.assert_array_equal(new.values, old.values)
    assert new.values.sum() > 0


def test_all_black_image_message():
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from genedml_sd.pp import tissue_mask

    rng = np.random.default_rng(1)
    img = rng.integers(0, 30, size=(3, 300, 300)).astype(np.uint8)
    sdata = SpatialData(
        images={"k": Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": Identity()})}
    )
    set_pixel_size(sdata, "k", 2.0)
    with pytest.raises(ValueError, match=r"no tissue in image 'k'.*every pixel is black or grey background") as err:
        tissue_mask(sdata, "k")
    assert "excluded background: " in str(err.value) and "px black" in str(err.value)
    assert "inf" not in str(err.value)
    # the optical density alone calls the whole black image tissue
    assert tissue_mask(sdata, "k", method=0.5, inplace=False).values.mean() == 1.0


def test_unknown_method():
    from genedml_sd.pp import tissue_mask

    with pytest.raises(ValueError, match="'saturation', 'otsu', 'triangle'"):
        tissue_mask(_grey_sdata(245), "g", method="hsv")
