"""The Gene-DML model layer: pure torch modules and losses, plus Lightning training.

This layer knows only tensors: it never imports spatialdata or anndata. Lightning is imported
only when training is asked for (:func:`train_gene_dml`, :class:`LitGeneDML`).
"""

from ._config import PRESETS, GeneDMLConfig
from ._data import SlideTensors, SpotBatches
from ._kmeans import kmeans
from ._losses import instance_group_loss, multiscale_instance_loss, prediction_loss, soft_target_instance_loss
from ._modules import Block, GeneDML, sinusoidal_position_encoding

_LAZY = {"train_gene_dml", "LitGeneDML", "resolve_precision", "mean_gene_pcc"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import _lightning

        return getattr(_lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "Block",
    "GeneDML",
    "GeneDMLConfig",
    "LitGeneDML",
    "SlideTensors",
    "SpotBatches",
    "instance_group_loss",
    "kmeans",
    "mean_gene_pcc",
    "multiscale_instance_loss",
    "prediction_loss",
    "resolve_precision",
    "sinusoidal_position_encoding",
    "soft_target_instance_loss",
    "train_gene_dml",
]
