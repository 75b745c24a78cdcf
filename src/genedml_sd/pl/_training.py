"""``gd.pl.training_curves``: losses and validation metrics by epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_NOT_CURVES = {"epoch", "step", "lr", "alpha"}


# --------------------------------------------------------------------------------------------- shared helpers
def _axes_list(ax: Axes | Sequence[Axes] | None) -> list[Axes] | None:
    """``ax`` as a flat list of Axes, or ``None``."""
    if ax is None:
        return None
    if isinstance(ax, np.ndarray):
        return list(ax.ravel())
    if isinstance(ax, Sequence):
        return list(ax)
    return [ax]


def _new_figure(n_panels: int, figsize: tuple[float, float] | None, panel_size: tuple[float, float]) -> list[Axes]:
    import matplotlib.pyplot as plt

    if figsize is None:
        figsize = (panel_size[0] * n_panels, panel_size[1])
    fig, axes = plt.subplots(1, n_panels, figsize=figsize, squeeze=False, layout="constrained")
    return list(axes.ravel())


def _finish(fig: Figure, save: str | Path | None, show: bool | None, dpi: float | None = None) -> Figure:
    """Save the figure to ``save`` (parent folders created) and show it if asked."""
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi if dpi is not None else "figure", bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig


# --------------------------------------------------------------------------------------------- training curves
def _history(model: Any) -> list[dict[str, Any]]:
    history = getattr(model, "history", model)
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or isinstance(history, str):
        raise TypeError(
            f"training_curves needs a model from gd.tl.fit (with .history) or a list of per-epoch dicts, "
            f"got {type(model).__name__}."
        )
    rows = list(history)
    if not rows:
        raise ValueError("The training history is empty: nothing to plot.")
    if not all(isinstance(r, Mapping) for r in rows):
        raise TypeError("Each history entry must be a dict of per-epoch values, e.g. {'epoch': 0, 'train/total': ...}.")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _best_epoch(rows: list[dict[str, Any]], epochs: np.ndarray) -> tuple[int | None, str | None, float]:
    """Index of the best epoch: max ``val/pcc``, else min ``val/mse`` or ``val/total``."""
    for key, pick in (("val/pcc", np.nanargmax), ("val/mse", np.nanargmin), ("val/total", np.nanargmin)):
        values = _series(rows, key)
        if np.isfinite(values).any():
            i = int(pick(np.where(np.isfinite(values), values, np.nan)))
            return i, key, float(values[i])
    return None, None, math.nan


def training_curves(
    model: Any,
    *,
    keys: Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    logy: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Training losses and validation metrics by epoch, with the best epoch marked.

    The first panel shows the loss components (``train/total``, ``train/instance``, ``train/group``,
    ``train/pred``, ...), the second (drawn only if the history has any) the validation metrics:
    ``val/pcc`` on the left axis and the others (``val/mse``, ...) on a right-hand axis. The best
    epoch (highest ``val/pcc``; lowest ``val/mse`` if there is no PCC) is marked by a dashed line
    in both panels. The learning rate, when it changes, is drawn on a right-hand axis of the loss panel.

    Parameters
    ----------
    model
        A model from :func:`genedml_sd.tl.fit` (its ``history`` is used), or a history itself: a
        list with one dict per epoch (``{"epoch": 0, "train/total": 0.9, "val/pcc": 0.1, ...}``).
    keys
        History entries to draw; by default every ``train/*`` and ``val/*`` entry. Entries starting
        with ``val/`` go to the validation panel, the others to the loss panel.
    ax
        Axes to draw into: one per panel (losses, then validation metrics). With fewer Axes than
        panels, the remaining panels are skipped. By default a new figure is made.
    figsize
        Figure size (width, height) in inches, when a new figure is made; default 5 x 3.6 in per panel.
    logy
        Log scale for the losses (useful when the total dwarfs its components).
    save
        Write the figure to this path (format from the extension, e.g. ``.png``, ``.pdf``).
    show
        Call :func:`matplotlib.pyplot.show` after drawing; by default the figure is only returned.

    Returns
    -------
    The figure. Losses are in the units of the training objective (MSE of log-normalised expression
    for ``train/pred``, dimensionless contrastive losses for ``train/instance`` and ``train/group``);
    ``val/pcc`` is a mean Pearson r over genes (dimensionless).

    Examples
    --------
    >>> model = gd.tl.fit([c2, c3, c4], method="mlp", max_epochs=20, val_sections=["C3"])  # doctest: +SKIP
    >>> fig = gd.pl.training_curves(model, save="curves.png")  # doctest: +SKIP
    """
    rows = _history(model)
    epochs = _series(rows, "epoch")
    if not np.isfinite(epochs).all():
        epochs = np.arange(len(rows), dtype=np.float64)
    available = list(dict.fromkeys(k for r in rows for k in r))
    if keys is None:
        keys = [k for k in available if k not in _NOT_CURVES and np.isfinite(_series(rows, k)).any()]
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in available]
        if missing:
            raise KeyError(f"History has no entries {missing}; available: {available}.")
    loss_keys = [k for k in keys if not k.startswith("val/")]
    val_keys = [k for k in keys if k.startswith("val/")]
    if not loss_keys and not val_keys:
        raise ValueError(f"No numeric curves to draw; history entries: {available}.")
    panels = [p for p, ks in (("loss", loss_keys), ("val", val_keys)) if ks]

    axes = _axes_list(ax)
    created = axes is None
    if axes is None:
        axes = _new_figure(len(panels), figsize, (5.0, 3.6))
    fig = cast("Figure", axes[0].figure)
    best, best_key, best_value = _best_epoch(rows, epochs)
    marker = "o" if len(rows) <= 30 else None

    for panel, axis in zip(panels, axes, strict=False):
        if panel == "loss":
            for k in loss_keys:
                axis.plot(epochs, _series(rows, k), marker=marker, ms=3, label=k)
            axis.set_ylabel("loss")
            axis.set_title("Training losses")
            if logy:
                axis.set_yscale("log")
            lr = _series(rows, "lr")
            handles, labels = axis.get_legend_handles_labels()
            if np.isfinite(lr).sum() > 1 and np.nanmax(lr) > np.nanmin(lr):
                twin = axis.twinx()
                (line,) = twin.plot(epochs, lr, color="0.5", ls=":", lw=1.2, label="lr")
                twin.set_ylabel("learning rate")
                twin.set_yscale("log")
                handles, labels = [*handles, line], [*labels, "lr"]
                legend_ax = twin
            else:
                legend_ax = axis
            legend_ax.legend(handles, labels, fontsize="small", loc="best")
        else:
            pcc_keys = [k for k in val_keys if "pcc" in k]
            other = [k for k in val_keys if k not in pcc_keys]
            left, right = (pcc_keys, other) if pcc_keys else (other, [])
            for k in left:
                axis.plot(epochs, _series(rows, k), marker=marker, ms=3, label=k)
            axis.set_ylabel("Pearson r" if pcc_keys else "value")
            handles, labels = axis.get_legend_handles_labels()
            legend_ax = axis
            if right:
                twin = legend_ax = axis.twinx()
                colors = [f"C{i + len(left)}" for i in range(len(right))]
                for k, c in zip(right, colors, strict=True):
                    (line,) = twin.plot(epochs, _series(rows, k), marker=marker, ms=3, ls="--", color=c, label=k)
                    handles, labels = [*handles, line], [*labels, k]
                twin.set_ylabel(", ".join(right))
            axis.set_title("Validation")
            legend_ax.legend(handles, labels, fontsize="small", loc="best")
        axis.set_xlabel("epoch")
        if len(rows) <= 10:
            axis.set_xticks(epochs)
        if best is not None:
            axis.axvline(epochs[best], color="k", ls="--", lw=1, alpha=0.6)
    if best is not None:
        text = f"best epoch {epochs[best]:g} ({best_key} = {best_value:.3f})"
        if created:
            fig.suptitle(text, fontsize="medium")
        else:
            axes[min(len(panels), len(axes)) - 1].set_title(text, fontsize="medium")
    return _finish(fig, save, show)
