"""Package-wide runtime settings, in the spirit of ``scanpy.settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_cache_dir() -> Path:
    env = os.environ.get("GENEDML_SD_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "genedml-sd"


@dataclass
class Settings:
    """Runtime switches.

    Attributes
    ----------
    progress
        Show tqdm progress bars.
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

    def __setattr__(self, name: str, value) -> None:
        if name == "cache_dir":
            if not isinstance(value, str | os.PathLike):
                raise TypeError(f"settings.cache_dir must be a path or a string, got {type(value).__name__}.")
            value = Path(value).expanduser()
        super().__setattr__(name, value)

    @property
    def n_workers(self) -> int:
        """Number of worker processes resolved from :attr:`n_jobs`."""
        if self.n_jobs is None or self.n_jobs < 0:
            return os.cpu_count() or 1
        return self.n_jobs


settings = Settings()
