"""Package-wide runtime settings, in the spirit of ``scanpy.settings``.

The package logs through the standard :mod:`logging` hierarchy under the ``"genedml_sd"`` logger. One
handler (to ``stderr``) is attached to that logger when the package is imported, and
:attr:`Settings.verbosity` sets its level, as ``scvi.settings.verbosity`` and ``sopa.settings`` do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

LOGGER_NAME = "genedml_sd"

_VERBOSITY_NAMES = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
# scanpy's integer levels: 0 error, 1 warning, 2 info, 3 hint/debug
_VERBOSITY_INTS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def _default_cache_dir() -> Path:
    env = os.environ.get("GENEDML_SD_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "genedml-sd"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at emit time (notebooks, pytest capture)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the current sys.stderr is always used
        pass


def _package_handler() -> logging.Handler:
    """The one stderr handler of the package logger (created once, reused on re-import)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        if getattr(handler, "_genedml_sd", False):
            return handler
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s [genedml_sd] %(message)s"))
    handler._genedml_sd = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return handler


def parse_verbosity(value: int | str) -> int:
    """A :mod:`logging` level from a verbosity name (``"info"``) or scanpy-style integer (0-3)."""
    if isinstance(value, bool):
        raise TypeError("settings.verbosity must be a level name or an int 0-3, not a bool.")
    if isinstance(value, str):
        key = value.lower()
        if key not in _VERBOSITY_NAMES:
            raise ValueError(f"settings.verbosity={value!r} is not one of {sorted(_VERBOSITY_NAMES)} (or 0-3).")
        return _VERBOSITY_NAMES[key]
    if isinstance(value, int):
        if value in _VERBOSITY_INTS:
            return _VERBOSITY_INTS[value]
        if value in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
            return value
        raise ValueError(f"settings.verbosity={value} is not 0-3 (error, warning, info, debug) or a logging level.")
    raise TypeError(f"settings.verbosity must be a level name or an int, got {type(value).__name__}.")


@dataclass
class Settings:
    """Runtime switches.

    Attributes
    ----------
    progress
        Show progress bars: tqdm bars of feature extraction and downloads, and the epoch bar of training
        (with the validation PCC).
    verbosity
        Level of the package's log messages on ``stderr``: ``"error"``, ``"warning"`` (default),
        ``"info"`` (what was inferred or chosen: elements, validation sections, feature modes, restored
        epochs) or ``"debug"``; or scanpy-style 0-3. Reading it returns the level name.
    n_jobs
        Worker processes for tile decoding (``DataLoader`` workers). ``-1`` means all cores.
    cache_dir
        Where feature caches and downloaded data go (a path or a string; stored as a
        :class:`~pathlib.Path`, ``~`` expanded). Defaults to ``$GENEDML_SD_CACHE`` or
        ``~/.cache/genedml-sd``.
    """

    progress: bool = True
    n_jobs: int = -1
    cache_dir: Path = field(default_factory=_default_cache_dir)
    verbosity: str = "warning"

    def __setattr__(self, name: str, value) -> None:
        if name == "cache_dir":
            if not isinstance(value, str | os.PathLike):
                raise TypeError(f"settings.cache_dir must be a path or a string, got {type(value).__name__}.")
            value = Path(value).expanduser()
        elif name == "verbosity":
            level = parse_verbosity(value)
            logging.getLogger(LOGGER_NAME).setLevel(level)
            _package_handler().setLevel(level)
            value = logging.getLevelName(level).lower()
        super().__setattr__(name, value)

    @property
    def n_workers(self) -> int:
        """Number of worker processes resolved from :attr:`n_jobs`."""
        if self.n_jobs is None or self.n_jobs < 0:
            return os.cpu_count() or 1
        return self.n_jobs


settings = Settings()
