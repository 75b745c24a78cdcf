from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import genedml_sd as gd
from genedml_sd.encoders import extract_features, load_encoder
from genedml_sd.tiling import LatticeTiler, SpotTiler, TileGeometry, plan_lattice

from .conftest import coordinate_image, decode_coordinates
from .test_tiling import make_sdata

GEO = TileGeometry(tile_um=16.0, tile_px=16, grid=3)  # 1 µm/px image: 16 px lattice pitch


class MeanColour(nn.Module):
    """Deterministic toy encoder: mean and std of each channel; counts the tiles it encodes."""

    name = "mean-colour"
    embed_dim = 6
    fingerprint = "mean-colour-test-v1"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _coordinate_slide(spots):
    return make_sdata([coordinate_image(512, 512)], spots, um_per_px=1.0)


# on-lattice spot (centre of lattice tile (10, 12)), an off-lattice spot in the same lattice tile, a far spot
SPOTS = np.array([[8.0 + 16 * 10, 8.0 + 16 * 12], [173.0, 195.0], [60.0, 50.0]])


def test_plan_snaps_to_nearest_lattice_centre():
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 3000, (200, 2))
    geo = TileGeometry()
    plan = plan_lattice(centres, 0.5, geo)  # pitch 224 px
    assert plan.pitch_px == pytest.approx(224.0)
    lattice_centres = plan.centres_px()
    own = lattice_centres[plan.token_index[:, 12]]
    # the centre token is the nearest lattice centre, within tile_um * sqrt(2) / 2
    d_all = np.linalg.norm(centres[:, None] - lattice_centres[None], axis=-1).min(1)
    np.testing.assert_allclose(np.linalg.norm(centres - own, axis=1), d_all)
    np.testing.assert_allclose(plan.snap_px, d_all)
    assert plan.snap_px.max() * 0.5 <= 112 * np.sqrt(2) / 2
    # token t = row * 5 + col sits at (col - 2, row - 2) lattice steps from the centre token
    for t in range(25):
        row, col = divmod(t, 5)
        step = np.broadcast_to(224.0 * np.array([col - 2, row - 2]), own.shape)
        np.testing.assert_allclose(lattice_centres[plan.token_index[:, t]] - own, step)
    assert len(np.unique(plan.cells, axis=0)) == plan.n_tiles  # each tile once
    assert not plan.on_lattice.any()


def test_lattice_tiles_come_from_the_right_place():
    s = _coordinate_slide(SPOTS)
    tiler = SpotTiler(s, "img", "spots", GEO)
    plan = plan_lattice(tiler.centres_px(0), tiler.um_per_px0, GEO)
    assert plan.n_tiles == 18 and plan.on_lattice.tolist() == [True, False, False]
    lattice = LatticeTiler.from_plan(tiler, plan)
    assert lattice.n_spots == 18 and lattice.level_for(GEO.um_per_px).level == 0
    tiles = lattice.local_tiles(np.arange(plan.n_tiles))
    for tile, (i, j) in zip(tiles, plan.cells, strict=True):
        x, y = decode_coordinates(tile)
        np.testing.assert_array_equal(x, np.broadcast_to(16 * i + np.arange(16)[None, :], (16, 16)))
        np.testing.assert_array_equal(y, np.broadcast_to(16 * j + np.arange(16)[:, None], (16, 16)))
    # the spot tiler itself is untouched
    assert tiler.n_spots == 3 and np.allclose(tiler.centres_px(0), SPOTS)


def test_on_lattice_spot_matches_spot_mode_exactly():
    s = _coordinate_slide(SPOTS)
    enc = MeanColour()
    spot = extract_features(s, enc, geometry=GEO, use_cache=False, num_workers=0)
    assert enc.calls == spot.n_encoded_tiles == 3 * 9 and spot.mode == "spot"
    enc.calls = 0
    lat = extract_features(s, enc, geometry=GEO, mode="lattice", use_cache=False, num_workers=0)
    # 18 unique lattice tiles + the exact local tile of the two off-lattice spots
    assert enc.calls == lat.n_encoded_tiles == 18 + 2 and lat.mode == "lattice"
    assert lat.neighbour.shape == spot.neighbour.shape == (3, 9, 6)
    np.testing.assert_allclose(lat.neighbour[0], spot.neighbour[0], atol=1e-4)  # on the lattice: identical
    np.testing.assert_allclose(lat.local, spot.local, atol=1e-4)  # local tiles are always exact
    np.testing.assert_allclose(lat.neighbour[:, 4], lat.local)  # centre token = local tile, as in spot mode
    # the off-lattice spot gathers the same lattice tokens as the on-lattice one, except its exact centre
    others = [t for t in range(9) if t != 4]
    np.testing.assert_allclose(lat.neighbour[1, others], lat.neighbour[0, others])
    assert not np.allclose(lat.neighbour[1, 4], lat.neighbour[0, 4])
    # mean R encodes the mean x coordinate: token 5 (right of centre) is one lattice step right
    assert lat.neighbour[1, 5, 0] - lat.neighbour[1, 3, 0] == pytest.approx(32.0, abs=1e-3)


def test_cache_keys_differ_by_mode_and_lattice_hits(tmp_path):
    s = _coordinate_slide(SPOTS)
    enc = MeanColour()
    kw = {"geometry": GEO, "cache_dir": tmp_path, "num_workers": 0}
    spot = extract_features(s, enc, **kw)
    lat = extract_features(s, enc, mode="lattice", **kw)
    assert spot.key != lat.key
    meta = json.loads((tmp_path / lat.key / "meta.json").read_text())
    assert meta["mode"] == "lattice" and meta["n_encoded_tiles"] == 20 and meta["lattice"]["n_tiles"] == 18
    assert json.loads((tmp_path / spot.key / "meta.json").read_text())["n_encoded_tiles"] == 27
    enc.calls = 0
    again = extract_features(s, enc, mode="lattice", **kw)
    assert enc.calls == 0 and again.key == lat.key and again.n_encoded_tiles == 20
    np.testing.assert_array_equal(again.neighbour, lat.neighbour)
    # local-only features (identical in both modes) come from a neighbour cache
    local = extract_features(s, enc, mode="lattice", neighbours=False, **kw)
    assert enc.calls == 0 and local.neighbour is None
    np.testing.assert_allclose(local.local, spot.local)
    with pytest.raises(ValueError, match="mode must be one of"):
        extract_features(s, enc, mode="grid", **kw)


def _subset(sdata, section, index):
    sub = sdata.subset([f"{section}_he", f"{section}_spots"], filter_tables=False)
    sub.shapes[f"{section}_spots"] = sdata[f"{section}_spots"].iloc[index]
    return sub


def test_demo_section_fewer_calls_and_similar_tokens(demo):
    c3 = demo[2]
    enc = MeanColour()
    # whole section, with a tile-decoding worker process (the lattice tiler must pickle)
    full = extract_features(c3, enc, mode="lattice", use_cache=False, num_workers=1)
    assert enc.calls == full.n_encoded_tiles
    assert full.encoded_tiles_per_spot <= 25 / 4, full.encoded_tiles_per_spot
    assert full.neighbour.shape == (full.n_spots, 25, 6)

    # a compact block of spots: spot mode costs 25 calls per spot, stain-texture tokens agree with the lattice's
    centres = SpotTiler(c3).centres_px(0)
    block = np.sort(np.argsort(np.linalg.norm(centres - np.median(centres, 0), axis=1))[:30])
    sub = _subset(c3, "C3", block)
    enc.calls = 0
    spot_mean = extract_features(sub, enc, use_cache=False, num_workers=0)
    assert enc.calls == spot_mean.n_encoded_tiles == 25 * 30
    lat_mean = extract_features(sub, enc, mode="lattice", use_cache=False, num_workers=0)
    # the lattice is anchored to the image, not to the spots: a subset gathers the same tokens
    np.testing.assert_allclose(lat_mean.neighbour, full.neighbour[block], atol=1e-3)

    stain = load_encoder("stain-texture")
    spot = extract_features(sub, stain, use_cache=False, num_workers=0)
    lat = extract_features(sub, stain, mode="lattice", use_cache=False, num_workers=0)
    assert lat.neighbour.shape == spot.neighbour.shape == (30, 25, stain.embed_dim)
    np.testing.assert_allclose(lat.local, spot.local, rtol=1e-3, atol=1e-3)
    a = lat.neighbour.reshape(-1, stain.embed_dim)
    b = spot.neighbour.reshape(-1, stain.embed_dim)
    ok = (a.std(0) > 1e-6) & (b.std(0) > 1e-6)
    assert ok.mean() > 0.9
    corr = [np.corrcoef(a[:, d], b[:, d])[0, 1] for d in np.flatnonzero(ok)]
    assert np.mean(corr) > 0.8, np.mean(corr)
    assert gd.settings.progress is False


def test_neighbour_cache_is_memory_mapped_and_exact(tmp_path):
    """Per-spot neighbour tokens go straight to the cache file and come back memory-mapped, unchanged."""
    s = _coordinate_slide(SPOTS)
    enc = MeanColour()
    kw = {"geometry": GEO, "num_workers": 0}
    in_memory = extract_features(s, enc, use_cache=False, **kw)
    first = extract_features(s, enc, cache_dir=tmp_path, **kw)
    again = extract_features(s, enc, cache_dir=tmp_path, **kw)
    assert isinstance(first.neighbour, np.memmap) and isinstance(again.neighbour, np.memmap)
    assert not again.neighbour.flags.writeable  # a cache hit can never be modified in place
    np.testing.assert_array_equal(first.neighbour, in_memory.neighbour)
    np.testing.assert_array_equal(again.neighbour, in_memory.neighbour)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary folder was moved into place


_SHARD_SCRIPT = """
import json, sys
import numpy as np
from genedml_sd.encoders import extract_features_sharded, process_rank
from tests.test_lattice import GEO, MeanColour, _coordinate_slide

slides = [(_coordinate_slide(np.array([[60.0 + 40 * i, 50.0 + 30 * i]])), None, None) for i in range(3)]
enc = MeanColour()
feats = extract_features_sharded(slides, enc, geometry=GEO, cache_dir=sys.argv[1], num_workers=0, poll_seconds=0.1, timeout=120)
print("RESULT " + json.dumps({"rank": process_rank(), "calls": enc.calls, "local": [f.local.tolist() for f in feats]}))
"""


@pytest.mark.timeout(300)
def test_sharded_extraction_splits_slides_between_processes(tmp_path):
    """torchrun-style launch of 2 processes: each encodes its own slides, both end with all features."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "PYTHONPATH": str(root)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SHARD_SCRIPT, str(tmp_path)],
                env=env,
                cwd=root,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=280)
        assert p.returncode == 0, out
        results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    # rank 0 encodes slides 0 and 2, rank 1 slide 1; one spot of 3x3 tiles each
    assert [r["rank"] for r in results] == [[0, 2, 0], [1, 2, 1]]
    assert [r["calls"] for r in results] == [2 * 9, 1 * 9]
    # identical features in both processes, equal to a single-process extraction
    assert results[0]["local"] == results[1]["local"]
    enc = MeanColour()
    for i, local in enumerate(results[0]["local"]):
        s = _coordinate_slide(np.array([[60.0 + 40 * i, 50.0 + 30 * i]]))
        ref = extract_features(s, enc, geometry=GEO, use_cache=False, num_workers=0)
        np.testing.assert_allclose(np.array(local), ref.local, atol=1e-5)


def test_process_rank_reads_the_launcher_environment(monkeypatch):
    from genedml_sd.encoders import process_rank

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert process_rank() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert process_rank() == (5, 8, 1)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation is not a launch
    assert process_rank() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_rank() == (3, 4, 3)


def test_slide_fingerprint_follows_pixels_and_spots_and_is_memoised(monkeypatch):
    from genedml_sd.encoders import _extract

    def fp(slide):
        return _extract.slide_fingerprint(SpotTiler(slide, "img", "spots", GEO))

    base = fp(_coordinate_slide(SPOTS))
    assert fp(_coordinate_slide(SPOTS)) == base  # same pixels and spots, another object
    assert fp(_coordinate_slide(SPOTS + 1.0)) != base  # spots moved
    other = make_sdata([coordinate_image(512, 512)[::-1].copy()], SPOTS, um_per_px=1.0)
    assert fp(other) != base  # other pixels
    # a second look at the same lazy image reads no pixels (the thumbnail is remembered by dask name)
    computes = []
    monkeypatch.setattr("dask.array.Array.compute", lambda self, **kw: computes.append(1) or np.asarray(self))
    assert fp(_coordinate_slide(SPOTS)) == base and computes == []
