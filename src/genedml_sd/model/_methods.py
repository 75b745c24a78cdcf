"""Registry of the trainable methods that share the Gene-DML interface (config, module, train function).

Every method reads the same cached frozen-encoder features (:class:`SlideTensors`), has a frozen
dataclass config with ``enc_dim``, ``n_genes`` and ``use_neighbour``, a module with
``predict_slide(local_all, coords_um, neighbour_all, batch_size=...)``, and a train function with the
signature of :func:`~genedml_sd.model.train_gene_dml`. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """Where a method's pieces live.

    Attributes
    ----------
    name
        Method name (``method=`` in :func:`genedml_sd.tl.fit`).
    config, model, train
        ``"module:name"`` of the config class, the ``nn.Module`` class and the train function.
    description
        One line for listings.
    """

    name: str
    config: str
    model: str
    train: str
    description: str

    def load(self) -> tuple[type, type, Any]:
        """Import and return ``(config_class, module_class, train_function)``."""
        return tuple(_resolve(ref) for ref in (self.config, self.model, self.train))


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "gene-dml",
            "genedml_sd.model._config:GeneDMLConfig",
            "genedml_sd.model._modules:GeneDML",
            "genedml_sd.model._lightning:train_gene_dml",
            "Gene-DML: three scales, multi-scale instance + cross-level instance-group contrast, MSE",
        ),
        MethodSpec(
            "nh2st",
            "genedml_sd.model._nh2st:NH2STConfig",
            "genedml_sd.model._nh2st:NH2ST",
            "genedml_sd.model._nh2st:train_nh2st",
            "NH2ST: query + hypergraph neighbour branches, cross-attention, two-level contrast, MSE",
        ),
        MethodSpec(
            "ridge",
            "genedml_sd.model._baselines:RidgeConfig",
            "genedml_sd.model._baselines:RidgeRegressor",
            "genedml_sd.model._baselines:fit_ridge",
            "PCA-256 + ridge regression on local features (HEST-Benchmark protocol)",
        ),
        MethodSpec(
            "mlp",
            "genedml_sd.model._baselines:MLPConfig",
            "genedml_sd.model._baselines:MLPRegressor",
            "genedml_sd.model._baselines:train_mlp",
            "ST-Net-like MLP head on local features, MSE",
        ),
        MethodSpec(
            "bleep",
            "genedml_sd.model._baselines:BLEEPConfig",
            "genedml_sd.model._baselines:BLEEP",
            "genedml_sd.model._baselines:train_bleep",
            "BLEEP: image/expression contrastive embedding, prediction = mean of top-50 retrieved spots",
        ),
    )
}


def get_method(name: str) -> tuple[type, type, Any]:
    """``(config_class, module_class, train_function)`` of a registered method."""
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; available: {sorted(METHODS)}.")
    return METHODS[name].load()


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
