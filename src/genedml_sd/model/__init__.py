"""The model layer: methods as pure torch modules and configs, one shared Lightning training plan.

This layer knows only tensors: it never imports spatialdata, anndata or pandas. Lightning is
imported only when gradient training starts (:func:`train_method`, :func:`train_module`,
:class:`TrainingPlan`).

A method is a :class:`~genedml_sd.model.MethodConfig` subclass, a :class:`SlideModule` subclass and an entry in the
registry (:func:`register_method`, :func:`get_method`, :func:`list_methods`); :func:`train_method`
trains it with :class:`TrainArgs` and returns a :class:`TrainResult`.
"""

from typing import TYPE_CHECKING, Any

from ._base import LossOutput, MethodConfig, SlideModule, TrainedConfig
from ._batch import SlidePart, SpotBatch
from ._bleep import BLEEP, BLEEPConfig, ProjectionHead
from ._config import PRESETS, GeneDMLConfig
from ._context import SlideContext, fixed_context_rows, sample_context_rows
from ._data import SlideTensors, SpotBatches, TokenGrid
from ._kmeans import kmeans
from ._losses import (
    instance_group_loss,
    mean_gene_pcc,
    multiscale_instance_loss,
    prediction_loss,
    soft_target_instance_loss,
)
from ._methods import MethodSpec, get_method, list_methods, register_method, train_gene_dml, train_method
from ._mlp import MLPConfig, MLPRegressor
from ._modules import Block, GeneDML, sinusoidal_position_encoding
from ._nh2st import NH2ST, NH2STConfig
from ._options import TrainArgs, TrainResult, quiet_lightning, resolve_precision
from ._ridge import RIDGE_ALPHAS, RidgeConfig, RidgeRegressor, RidgeResult, fit_ridge

_LAZY = {"train_module": "_train", "TrainingPlan": "_plan"}

if TYPE_CHECKING:  # pragma: no cover (imported lazily at run time: they import lightning)
    from ._plan import TrainingPlan
    from ._train import train_module


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLEEP",
    "NH2ST",
    "PRESETS",
    "RIDGE_ALPHAS",
    "BLEEPConfig",
    "Block",
    "GeneDML",
    "GeneDMLConfig",
    "LossOutput",
    "MLPConfig",
    "MLPRegressor",
    "MethodConfig",
    "MethodSpec",
    "NH2STConfig",
    "ProjectionHead",
    "RidgeConfig",
    "RidgeRegressor",
    "RidgeResult",
    "SlideModule",
    "SlideContext",
    "SlideTensors",
    "SlidePart",
    "SpotBatch",
    "SpotBatches",
    "TokenGrid",
    "TrainArgs",
    "TrainResult",
    "TrainedConfig",
    "TrainingPlan",
    "fit_ridge",
    "fixed_context_rows",
    "get_method",
    "instance_group_loss",
    "kmeans",
    "list_methods",
    "mean_gene_pcc",
    "multiscale_instance_loss",
    "prediction_loss",
    "quiet_lightning",
    "register_method",
    "resolve_precision",
    "sample_context_rows",
    "sinusoidal_position_encoding",
    "soft_target_instance_loss",
    "train_gene_dml",
    "train_method",
    "train_module",
]
