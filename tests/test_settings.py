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


def test_verbosity_sets_the_package_logger_and_shows_info_once(capsys):
    import logging

    from genedml_sd import settings

    old = settings.verbosity
    try:
        settings.verbosity = "info"
        assert settings.verbosity == "info"
        logger = logging.getLogger("genedml_sd.tl._fit")
        logger.info("chosen element %s", "spots")
        logger.debug("hidden detail")
        err = capsys.readouterr().err
        assert err.count("chosen element spots") == 1 and "hidden detail" not in err
        settings.verbosity = 1  # scanpy-style integer: warning
        assert settings.verbosity == "warning"
        logger.info("now hidden")
        assert "now hidden" not in capsys.readouterr().err
        handlers = [h for h in logging.getLogger("genedml_sd").handlers if getattr(h, "_genedml_sd", False)]
        assert len(handlers) == 1
        with pytest.raises(ValueError, match="verbosity"):
            settings.verbosity = "loud"
        with pytest.raises(ValueError, match="0-3"):
            settings.verbosity = 7
    finally:
        settings.verbosity = old
