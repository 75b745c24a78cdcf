from __future__ import annotations

from pathlib import Path

import pytest

from genedml_sd._settings import Settings


def test_cache_dir_accepts_strings_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings()
    s.cache_dir = "~/gd"
    assert s.cache_dir == tmp_path / "gd" and isinstance(s.cache_dir, Path)
    assert s.cache_dir / "features" == tmp_path / "gd" / "features"
    with pytest.raises(TypeError, match="cache_dir"):
        s.cache_dir = 3


def test_cache_dir_default_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GENEDML_SD_CACHE", str(tmp_path / "env"))
    assert Settings().cache_dir == tmp_path / "env"
    monkeypatch.delenv("GENEDML_SD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Settings().cache_dir == tmp_path / "xdg" / "genedml-sd"
