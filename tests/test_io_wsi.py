"""gd.io.wsi on pyramidal TIFF / SVS / OME-TIFF files written from a real HER2ST H&E (tifffile 2026.3.3)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import genedml_sd as gd
from genedml_sd._spatial import image_levels
from genedml_sd.datasets._layouts.her2st import her2st_b4
from genedml_sd.datasets._layouts.tenx import write_pyramid_tiff
from genedml_sd.datasets._layouts.wsi import write_huge, write_svs

WINDOW = (1234, 987)  # x, y of a 224 px window, level 0


@pytest.fixture(scope="module")
def he():
    return her2st_b4().image  # (3072, 3793, 3) uint8, real H&E


def _window(sdata, key, level=0, xy=WINDOW, side=224):
    lv = image_levels(sdata[key])[level]
    x, y = xy
    return lv[:, y : y + side, x : x + side].values.transpose(1, 2, 0)


def test_subifd_pyramid_with_cm_resolution(he, tmp_path):
    levels = write_pyramid_tiff(tmp_path / "slide.tif", he, n_sub=2, tile=256, resolution_um=0.5)
    s = gd.io.wsi(tmp_path / "slide.tif")
    assert list(s.images) == ["slide_he"]
    assert gd.io.get_pixel_size(s, "slide_he") == pytest.approx(0.5, rel=1e-2)
    read = image_levels(s["slide_he"])
    # the file's own levels, not recomputed; lazy with the file's tiles as chunks
    assert [tuple(lv.shape) for lv in read] == [(3, *lv.shape[:2]) for lv in levels]
    assert read[0].data.chunksize == (3, 256, 256) and read[0].dtype == np.uint8
    x, y = WINDOW
    np.testing.assert_array_equal(_window(s, "slide_he"), he[y : y + 224, x : x + 224])
    np.testing.assert_array_equal(_window(s, "slide_he", 1, (300, 200)), levels[1][200:424, 300:524])


def test_inch_resolution_and_ome_units(he, tmp_path):
    import tifffile

    img = he[:1024, :1024]
    tifffile.imwrite(
        tmp_path / "inch.tif", img, tile=(256, 256), photometric="rgb", resolution=(25400 / 0.25, 25400 / 0.25),
        resolutionunit="INCH", metadata=None,
    )  # fmt: skip
    assert gd.io.get_pixel_size(gd.io.wsi(tmp_path / "inch.tif"), "inch_he") == pytest.approx(0.25, rel=1e-2)
    write_pyramid_tiff(tmp_path / "b4.ome.tif", he, n_sub=1, ome_um=0.2631)
    s = gd.io.wsi(tmp_path / "b4.ome.tif")
    assert list(s.images) == ["b4_he"] and gd.io.get_pixel_size(s, "b4_he") == pytest.approx(0.2631, rel=1e-2)
    x, y = WINDOW
    np.testing.assert_array_equal(_window(s, "b4_he"), he[y : y + 224, x : x + 224])
    with tifffile.TiffWriter(tmp_path / "nm.ome.tif", ome=True) as tif:
        tif.write(img, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"})
    assert gd.io.get_pixel_size(gd.io.wsi(tmp_path / "nm.ome.tif"), "nm_he") == pytest.approx(0.25, rel=1e-2)


def test_aperio_svs(he, tmp_path):
    import tifffile

    levels = write_svs(tmp_path / "b4.svs", he, mpp=0.5)
    with tifffile.TiffFile(tmp_path / "b4.svs") as tif:
        assert tif.is_svs and len(tif.series[0].levels) == 3  # baseline + 2 resolutions (thumbnail etc. apart)
        decoded = tif.pages[0].asarray()
    s = gd.io.wsi(tmp_path / "b4.svs")
    assert gd.io.get_pixel_size(s, "b4_he") == pytest.approx(0.5, rel=1e-2)
    read = image_levels(s["b4_he"])
    assert [lv.shape[1:] for lv in read] == [lv.shape[:2] for lv in levels]
    x, y = WINDOW
    window = _window(s, "b4_he")
    np.testing.assert_array_equal(window, decoded[y : y + 224, x : x + 224])  # the file's JPEG tiles, exactly
    assert np.abs(window.astype(int) - he[y : y + 224, x : x + 224]).mean() < 4  # ... which are the H&E


def test_missing_pixel_size_is_a_clear_error(he, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "bare.tif", he[:512, :512], tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(ValueError, match=r"bare\.tif records no pixel size.*um_per_px="):
        gd.io.wsi(tmp_path / "bare.tif")
    s = gd.io.wsi(tmp_path / "bare.tif", um_per_px=0.5, image_key="he")
    assert gd.io.get_pixel_size(s, "he") == 0.5
    tifffile.imwrite(tmp_path / "dpi72.tif", he[:512, :512], photometric="rgb", resolution=(72, 72), metadata=None)
    with pytest.raises(ValueError, match=r"dpi72\.tif records no pixel size.*placeholder"):
        gd.io.wsi(tmp_path / "dpi72.tif")
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        gd.io.wsi(tmp_path / "nope.tif")


def test_passed_pixel_size_that_disagrees_warns(he, tmp_path):
    write_pyramid_tiff(tmp_path / "s.tif", he[:1024, :1024], n_sub=1, resolution_um=0.5)
    with pytest.warns(UserWarning, match=r"um_per_px=0.6 differs by 20% from the 0.5 µm/px"):
        s = gd.io.wsi(tmp_path / "s.tif", um_per_px=0.6)
    assert gd.io.get_pixel_size(s, "s_he") == 0.6
    with warnings_as_errors():
        gd.io.wsi(tmp_path / "s.tif", um_per_px=0.51)  # 2 %: no warning


def test_single_level_tiff_gets_lazy_coarse_levels(he, tmp_path):
    import tifffile

    tifffile.imwrite(
        tmp_path / "flat.tif", he, tile=(256, 256), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    s = gd.io.wsi(tmp_path / "flat.tif")
    read = image_levels(s["flat_he"])
    assert [lv.shape[1:] for lv in read] == [(3072, 3793), (1536, 1896), (768, 948)]
    block = he[400:464, 600:664].astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    got = read[1][:, 200:232, 300:332].values.transpose(1, 2, 0)
    np.testing.assert_array_equal(got, np.round(block).astype(np.uint8))


def _read_window(arr, y, x):
    return arr[:, y : y + 224, x : x + 224].compute(scheduler="synchronous")


def test_levels_are_picklable_and_safe_in_worker_processes(he, tmp_path):
    """Data-loader workers get the lazy levels pickled (spawn) or inherited (fork): each reopens the file."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    write_pyramid_tiff(tmp_path / "w.tif", he, n_sub=1, resolution_um=0.5)
    level = image_levels(gd.io.wsi(tmp_path / "w.tif")["w_he"])[0].data
    np.testing.assert_array_equal(_read_window(pickle.loads(pickle.dumps(level)), 40, 50), _read_window(level, 40, 50))
    starts = [(0, 0), (1000, 2000), (2800, 3500), (512, 512)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        got = list(pool.map(_read_window, [level] * len(starts), *zip(*starts, strict=True)))
    for (y, x), window in zip(starts, got, strict=True):
        np.testing.assert_array_equal(window.transpose(1, 2, 0), he[y : y + 224, x : x + 224])


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class PeakRSS:
    """Peak resident memory growth of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.baseline = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.growth_mb = (self.peak - self.baseline) / 2**20


def test_memory_flat_on_a_100000_px_wide_slide(he, tmp_path):
    pytest.importorskip("psutil")
    tissue = np.ascontiguousarray(he[1024:2048, 1024:2048])
    x0, y0 = write_huge(tmp_path / "huge.tif", tissue)  # 100,000 x 20,000 px RGB = 6 GB decoded
    assert (tmp_path / "huge.tif").stat().st_size < 50e6
    with PeakRSS() as mem:
        s = gd.io.wsi(tmp_path / "huge.tif")
        read = image_levels(s["huge_he"])
        window = read[0][:, y0 + 100 : y0 + 324, x0 + 200 : x0 + 424].values
        coarse = read[-1][:, :224, :224].values
    assert read[0].shape == (3, 20_000, 100_000) and gd.io.get_pixel_size(s, "huge_he") == pytest.approx(0.25)
    assert min(read[-1].shape[1:]) < 1024  # file levels down to 1/8, then averaged ones
    np.testing.assert_array_equal(window.transpose(1, 2, 0), tissue[100:324, 200:424])
    assert (coarse == 240).all()
    print(f"peak RSS growth reading a 100,000 x 20,000 px slide and two windows: {mem.growth_mb:.0f} MB")
    assert mem.growth_mb < 500
