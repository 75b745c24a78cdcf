"""Gene-DML on SpatialData: predict spatial gene expression from H&E histology.

Submodules load lazily so that ``import genedml_sd`` stays fast; ``gd.tl``, ``gd.io`` and the
others are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import TYPE_CHECKING

from ._settings import settings

try:
    __version__ = version("genedml-sd")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"

_SUBMODULES = ("datasets", "encoders", "io", "model", "pl", "pp", "tiling", "tl")

__all__ = [*_SUBMODULES, "settings", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, encoders, io, model, pl, pp, tiling, tl


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
