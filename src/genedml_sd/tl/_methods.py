"""The public method registry: add a method from another package with one config, one module and one call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Callable

    from genedml_sd.model import MethodSpec


def register_method(
    name: str,
    *,
    config: type,
    module: type,
    fit: Callable[..., Any] | None = None,
    description: str = "",
    overwrite: bool = False,
) -> MethodSpec:
    """Add a method that ``fit``, ``predict``, save / load and ``cross_validate`` can use by name.

    Parameters
    ----------
    name
        The name passed as ``method=``.
    config
        Its configuration: a frozen dataclass deriving from :class:`genedml_sd.model.MethodConfig` (fields
        ``enc_dim`` and ``n_genes`` are filled from the data).
    module
        Its torch module: a :class:`genedml_sd.model.SlideModule` subclass built as ``module(config)``.
        A gradient-trained method implements ``training_loss``; the shared training plan does the rest
        (batches, validation, early stopping, checkpoints).
    fit
        For a method with its own solver (closed form, e.g. ridge) instead of gradient training: a
        function ``fit(train, val, config, args) -> TrainResult`` (see :func:`genedml_sd.model.train_method`).
    description
        One line shown by :func:`list_methods`.
    overwrite
        Replace a method registered under the same name.

    Returns
    -------
    The registered :class:`~genedml_sd.model.MethodSpec`.

    Notes
    -----
    A saved model records its method's name: register the method (import the package that does) before
    :meth:`TrainedModel.load <genedml_sd.tl.TrainedModel.load>`. See the docs page "Adding a method".
    """
    from genedml_sd.model import register_method as _register

    return _register(name, config=config, module=module, fit=fit, description=description, overwrite=overwrite)


def list_methods() -> pd.DataFrame:
    """The registered methods: name, config and module classes, whether gradient-trained, description."""
    from genedml_sd.model import get_method
    from genedml_sd.model import list_methods as _names

    rows = []
    for name in _names():
        spec = get_method(name)
        rows.append(
            {
                "method": name,
                "config": f"{spec.config.__module__}.{spec.config.__qualname__}",
                "module": f"{spec.module.__module__}.{spec.module.__qualname__}",
                "trained_by": "own solver" if spec.fit is not None else "training plan (Lightning)",
                "description": spec.description,
            }
        )
    return pd.DataFrame(rows).set_index("method")
