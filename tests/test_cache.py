"""The feature cache: damaged entries are detected and recomputed, concurrent writers do not collide."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from genedml_sd.encoders import _cache, extract_features

from .test_lattice import GEO, SPOTS, MeanColour, _coordinate_slide

KW = {"geometry": GEO, "num_workers": 0}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cached(tmp_path):
    """A slide, its in-memory features and a cache entry written for them."""
    s = _coordinate_slide(SPOTS)
    ref = extract_features(s, MeanColour(), use_cache=False, **KW)
    first = extract_features(s, MeanColour(), cache_dir=tmp_path, **KW)
    return s, ref, tmp_path / first.key


def _again(s, root, caplog):
    enc = MeanColour()
    with caplog.at_level(logging.WARNING, logger="genedml_sd.encoders._cache"):
        feats = extract_features(s, enc, cache_dir=root, **KW)
    return feats, enc.calls


def _assert_recomputed_and_valid(s, ref, folder, feats, calls):
    assert calls == ref.n_encoded_tiles == 27  # recomputed, not reused
    np.testing.assert_array_equal(feats.local, ref.local)
    np.testing.assert_array_equal(feats.neighbour, ref.neighbour)
    enc = MeanColour()
    hit = extract_features(s, enc, cache_dir=folder.parent, **KW)  # the rewritten entry is valid again
    assert enc.calls == 0 and isinstance(hit.neighbour, np.memmap)
    np.testing.assert_array_equal(hit.neighbour, ref.neighbour)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_entry_records_size_and_hash(cached):
    s, ref, folder = cached
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == _cache.CACHE_FORMAT == 2
    for name in ("local.npy", "neighbour.npy"):
        rec = meta["files"][name]
        assert rec["bytes"] == (folder / name).stat().st_size
        assert rec["sha256"] == _cache.file_digest(folder / name)
    import hashlib

    assert meta["files"]["local.npy"]["sha256"] == hashlib.sha256((folder / "local.npy").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["local.npy", "neighbour.npy"])
@pytest.mark.parametrize("how", ["zeroed", "replaced"])
def test_zeroed_or_replaced_array_is_detected_and_recomputed(cached, caplog, name, how):
    s, ref, folder = cached
    path = folder / name
    size = path.stat().st_size
    if how == "zeroed":  # same size, header kept, data zeroed in place
        with open(path, "r+b") as fh:
            fh.seek(128)
            fh.write(b"\0" * (size - 128))
    else:  # a valid .npy of the same shape and size, other values
        np.save(path, np.ones_like(np.load(path)))
    assert path.stat().st_size == size
    feats, calls = _again(s, folder.parent, caplog)
    assert any(str(path) in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records), caplog.text
    _assert_recomputed_and_valid(s, ref, folder, feats, calls)


@pytest.mark.parametrize("name", ["local.npy", "neighbour.npy", "meta.json"])
def test_truncated_file_is_detected_and_recomputed(cached, caplog, name):
    s, ref, folder = cached
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    feats, calls = _again(s, folder.parent, caplog)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and "truncated" in m and "recomputing" in m for m in warned), warned
    _assert_recomputed_and_valid(s, ref, folder, feats, calls)


def test_missing_array_and_older_format_are_recomputed(cached, caplog):
    s, ref, folder = cached
    (folder / "neighbour.npy").unlink()
    feats, calls = _again(s, folder.parent, caplog)
    assert any("neighbour.npy" in r.getMessage() for r in caplog.records)
    _assert_recomputed_and_valid(s, ref, folder, feats, calls)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))  # written by an earlier version
    feats, calls = _again(s, folder.parent, caplog)
    _assert_recomputed_and_valid(s, ref, folder, feats, calls)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftover_temp_folders_are_removed_live_ones_kept(tmp_path):
    s = _coordinate_slide(SPOTS)
    host = socket.gethostname()
    dead = tmp_path / f".abc.{_dead_pid()}.0f0f0f0f.{host}.tmp"  # killed run on this host
    old = tmp_path / ".abc.tmp"  # an earlier version's name, untouched for two hours
    trash = tmp_path / f".abc.{_dead_pid()}.12345678.{host}.old"
    alive = tmp_path / f".abc.{os.getpid()}.01234567.{host}.tmp"  # a writer of this very process
    remote = tmp_path / ".abc.4242.89abcdef.some-other-node.cluster.tmp"  # another host, fresh
    for d in (dead, old, trash, alive, remote):
        d.mkdir()
        np.lib.format.open_memmap(d / "neighbour.npy", mode="w+", dtype=np.float32, shape=(2, 2))
    two_hours_ago = time.time() - 7200
    for p in (old / "neighbour.npy", old):
        os.utime(p, (two_hours_ago, two_hours_ago))
    feats = extract_features(s, MeanColour(), cache_dir=tmp_path, **KW)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([feats.key, alive.name, remote.name])
    os.utime(remote, (two_hours_ago, two_hours_ago))  # a remote writer's folder is stale only when untouched
    assert _cache.remove_stale_temps(tmp_path) == []  # its file is still fresh
    os.utime(remote / "neighbour.npy", (two_hours_ago, two_hours_ago))
    assert _cache.remove_stale_temps(tmp_path) == [remote]


def test_losing_writer_reuses_the_winners_entry(tmp_path, caplog):
    local = np.arange(12, dtype=np.float32).reshape(3, 4)
    nb = np.arange(36, dtype=np.float32).reshape(3, 3, 4)
    a, b = _cache.EntryWriter(tmp_path, "k"), _cache.EntryWriter(tmp_path, "k")
    assert a.tmp != b.tmp and a.tmp.exists() and b.tmp.exists()
    mm = b.open_neighbour(nb.shape)  # b writes its neighbour tokens through a memory map
    mm[:] = nb
    mm.flush()
    del mm
    assert a.commit(local, nb, {"n_spots": 3}) is True
    assert b.commit(local, None, {"n_spots": 3}) is False  # lost the race: its folder is discarded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
    entry = _cache.read_entry(tmp_path, "k", n_spots=3, dim=4, n_neighbours=3)
    np.testing.assert_array_equal(entry.local, local)
    np.testing.assert_array_equal(entry.neighbour, nb)
    assert isinstance(entry.neighbour, np.memmap) and not entry.neighbour.flags.writeable
    # a damaged entry in the way is replaced, not reused
    np.save(tmp_path / "k" / "local.npy", np.zeros_like(local))
    c = _cache.EntryWriter(tmp_path, "k")
    with caplog.at_level(logging.WARNING, logger="genedml_sd.encoders._cache"):
        assert c.commit(local + 1, nb, {"n_spots": 3}) is True
    assert "local.npy" in caplog.text
    np.testing.assert_array_equal(_cache.read_entry(tmp_path, "k", n_spots=3, dim=4, n_neighbours=3).local, local + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


_WRITER_SCRIPT = """
import json, sys, time
from pathlib import Path
import numpy as np
import genedml_sd as gd
from genedml_sd.encoders import extract_features
from tests.test_lattice import GEO, SPOTS, MeanColour, _coordinate_slide

class Slow(MeanColour):
    def forward(self, x):
        time.sleep(0.3)  # keep both processes inside the write at the same time
        return super().forward(x)

gd.settings.progress = False
s = _coordinate_slide(SPOTS)
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported and ready
while not go.exists():
    time.sleep(0.005)
enc = Slow()
f = extract_features(s, enc, geometry=GEO, cache_dir=sys.argv[1], num_workers=0, batch_size=1)
print("RESULT " + json.dumps({"key": f.key, "calls": enc.calls, "local": f.local.tolist(),
                              "neighbour": np.asarray(f.neighbour).tolist(), "memmap": isinstance(f.neighbour, np.memmap)}))
"""


@pytest.mark.timeout(300)
def test_two_processes_fill_one_cache_at_once(tmp_path):
    root, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER_SCRIPT, str(root), str(go), str(r)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 240
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start extracting at the same moment
    results = []
    for p in procs:
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    assert all(r["calls"] == 27 for r in results)  # both computed: they overlapped
    assert results[0] == results[1]
    assert results[0]["memmap"]
    ref = extract_features(_coordinate_slide(SPOTS), MeanColour(), use_cache=False, **KW)
    np.testing.assert_array_equal(np.array(results[0]["local"], np.float32), ref.local)
    np.testing.assert_array_equal(np.array(results[0]["neighbour"], np.float32), ref.neighbour)
    # one valid entry, no temporary folder
    key = results[0]["key"]
    assert sorted(p.name for p in root.iterdir()) == [key]
    entry = _cache.read_entry(root, key, n_spots=3, dim=6, n_neighbours=9)
    assert entry is not None
    np.testing.assert_array_equal(entry.neighbour, ref.neighbour)
