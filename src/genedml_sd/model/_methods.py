"""The method registry: every trainable method as a config class, a module class and (optionally) a fit function.

A method defined in another package needs one :class:`~genedml_sd.model.MethodConfig` subclass, one
:class:`~genedml_sd.model.SlideModule` subclass implementing ``predict_batch`` and ``training_loss``,
and one :func:`register_method` call; :func:`train_method` then trains it with the shared training
plan, and :func:`genedml_sd.tl.fit` / ``predict`` / save / load use it by name.

Importing this module imports only torch and numpy; Lightning is imported when gradient training starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._base import MethodConfig, SlideModule
from ._bleep import BLEEP, BLEEPConfig
from ._config import GeneDMLConfig
from ._data import SlideTensors
from ._mlp import MLPConfig, MLPRegressor
from ._modules import GeneDML
from ._nh2st import NH2ST, NH2STConfig
from ._options import TrainArgs, TrainResult
from ._ridge import RidgeConfig, RidgeRegressor, fit_ridge_method

logger = logging.getLogger(__name__)

#: A method's own solver: ``fit(train, val, config, args) -> TrainResult``.
FitFunction = Callable[..., TrainResult]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes
    ----------
    name
        Method name (``method=`` in :func:`genedml_sd.tl.fit`).
    config
        Its config class (a :class:`~genedml_sd.model.MethodConfig` subclass).
    module
        Its module class (a :class:`~genedml_sd.model.SlideModule` subclass), built as ``module(config)``.
    fit
        ``None`` for gradient training with the shared plan (:func:`~genedml_sd.model.train_module`), or the
        method's own solver ``fit(train, val, config, args) -> TrainResult`` (e.g. ridge's closed form).
    description
        One line for listings.
    """

    name: str
    config: type[MethodConfig]
    module: type[SlideModule]
    fit: FitFunction | None = None
    description: str = ""

    @property
    def gradient_trained(self) -> bool:
        """Whether the method is trained by the shared training plan (no own ``fit``)."""
        return self.fit is None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type[MethodConfig],
    module: type[SlideModule],
    fit: FitFunction | None = None,
    description: str = "",
    overwrite: bool = False,
) -> MethodSpec:
    """Add a method to the registry.

    Parameters
    ----------
    name
        The method's name (non-empty string).
    config
        Its config class: a frozen dataclass deriving from :class:`~genedml_sd.model.MethodConfig`.
    module
        Its module class: a :class:`~genedml_sd.model.SlideModule` subclass built as ``module(config)``.
        Without ``fit`` it must implement ``training_loss``.
    fit
        Optional own solver ``fit(train, val, config, args) -> TrainResult`` replacing gradient training.
    description
        One line for listings.
    overwrite
        Replace a method already registered under ``name``.

    Returns
    -------
    The new :class:`~genedml_sd.model.MethodSpec`.

    Raises
    ------
    ValueError
        Duplicate name without ``overwrite``, or an empty name.
    TypeError
        ``config`` / ``module`` of the wrong kind, a gradient-trained module without ``training_loss``,
        or a ``fit`` that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A method name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Method {name!r} is already registered; pass overwrite=True to replace it.")
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"config of method {name!r} must be a MethodConfig subclass, got {config!r}.")
    if not (isinstance(module, type) and issubclass(module, SlideModule)):
        raise TypeError(f"module of method {name!r} must be a SlideModule subclass, got {module!r}.")
    if fit is not None and not callable(fit):
        raise TypeError(f"fit of method {name!r} must be callable or None, got {fit!r}.")
    if fit is None and module.training_loss is SlideModule.training_loss:
        raise TypeError(
            f"{module.__name__} (method {name!r}) has no training_loss: implement it for gradient training, "
            "or pass fit= for a method with its own solver."
        )
    if module.predict_batch is SlideModule.predict_batch and module.predict_slide is SlideModule.predict_slide:
        raise TypeError(f"{module.__name__} (method {name!r}) must implement predict_batch.")
    spec = MethodSpec(name, config, module, fit, description)
    _REGISTRY[name] = spec
    return spec


def get_method(name: str | MethodSpec) -> MethodSpec:
    """The :class:`~genedml_sd.model.MethodSpec` registered under ``name`` (a spec is returned as is).

    Raises
    ------
    KeyError
        Unknown name; the message lists the registered methods.
    """
    if isinstance(name, MethodSpec):
        return name
    if name not in _REGISTRY:
        raise KeyError(f"Unknown method {name!r}; registered methods: {list_methods()}.")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order (the built-in ones first)."""
    return list(_REGISTRY)


def train_method(
    method: str | MethodSpec,
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: MethodConfig,
    args: TrainArgs | None = None,
) -> TrainResult:
    """Train a registered method: its own ``fit`` if it has one, else the shared training plan.

    For gradient training the global random generators are seeded with ``args.seed``
    (``lightning.seed_everything``), the module is built from ``config.for_training(train)`` and
    trained by :func:`~genedml_sd.model.train_module`.

    Parameters
    ----------
    method
        Registered name or :class:`~genedml_sd.model.MethodSpec`.
    train, val
        Slides with features and expression; ``val`` (may be ``None``) selects the best epoch and
        stops training early. Validation slides must come from the training data, never the test fold.
    config
        An instance of the method's config class (``enc_dim``, ``n_genes`` must match the slides).
    args
        Training arguments (default ``TrainArgs()``).

    Returns
    -------
    :class:`~genedml_sd.model.TrainResult` (``module`` in eval mode, ``config`` as built, ``history``,
    ``best_epoch``).
    """
    from ._base import check_slides

    spec = get_method(method)
    args = TrainArgs() if args is None else args
    if not isinstance(config, spec.config):
        raise TypeError(f"Method {spec.name!r} needs a {spec.config.__name__}, got {type(config).__name__}.")
    check_slides(train, val, config)
    if spec.fit is not None:
        t0 = time.perf_counter()
        result = spec.fit(train, val, config, args)
    else:
        import lightning.pytorch as pl

        from ._train import train_module

        t0 = time.perf_counter()
        pl.seed_everything(args.seed, workers=True, verbose=False)
        module = spec.module(config.for_training(train))
        result = train_module(module, train, val, args, method=spec.name)
    result.seconds = time.perf_counter() - t0
    return result


def train_gene_dml(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: GeneDMLConfig,
    args: TrainArgs | None = None,
    **train_args: Any,
) -> TrainResult:
    """Train Gene-DML: ``train_method("gene-dml", train, val, config, args or TrainArgs(**train_args))``."""
    if args is not None and train_args:
        raise TypeError(f"Pass either args or keyword training arguments, not both (got {sorted(train_args)}).")
    return train_method("gene-dml", train, val, config, args if args is not None else TrainArgs(**train_args))


register_method(
    "gene-dml",
    config=GeneDMLConfig,
    module=GeneDML,
    description="Gene-DML: three scales, multi-scale instance + cross-level instance-group contrast, MSE",
)
register_method(
    "nh2st",
    config=NH2STConfig,
    module=NH2ST,
    description="NH2ST: query + hypergraph neighbour branches, cross-attention, two-level contrast, MSE",
)
register_method(
    "ridge",
    config=RidgeConfig,
    module=RidgeRegressor,
    fit=fit_ridge_method,
    description="PCA-256 + ridge regression on local features (HEST-Benchmark protocol)",
)
register_method("mlp", config=MLPConfig, module=MLPRegressor, description="ST-Net-like MLP head on local features, MSE")
register_method(
    "bleep",
    config=BLEEPConfig,
    module=BLEEP,
    description="BLEEP: image/expression contrastive embedding, prediction = mean of top-50 retrieved spots",
)
