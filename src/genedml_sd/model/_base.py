"""What every method shares: its config base, its module base, the typed loss and one training batch.

A method is a frozen-dataclass config (:class:`~genedml_sd.model.MethodConfig`) and a torch module built from the config
alone (:class:`SlideModule`). The module holds its fitted state in parameters and buffers (so
``module_cls(config)`` + ``load_state_dict`` restores it), standardises the frozen-encoder features with
training statistics, and predicts a whole slide with :meth:`SlideModule.predict_slide`. A
gradient-trained module also implements :meth:`SlideModule.training_loss`; the shared training plan
(:func:`~genedml_sd.model.train_module`) does batching, validation, optimisation and checkpoints.

Only torch and numpy are imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from genedml_sd._docs import docs

from ._batch import SpotBatch
from ._data import SlideTensors

SCALES: tuple[str, ...] = ("local", "neighbour", "global")


# ====================================================================================== config
@docs
@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's configuration (a frozen dataclass).

    Subclasses add their hyper-parameters as dataclass fields with defaults and check them in
    ``__post_init__``. The scale switches ``use_local``, ``use_neighbour``, ``use_global`` are class
    constants here (local features only); a method that reads the 5x5 neighbour-grid features (or
    wants the switches saved with the config) declares them as fields.

    Attributes
    ----------
    %(config_dims)s
    """

    # plain class attributes, not ClassVar annotations: a subclass may declare them as fields without
    # the fields moving before ``enc_dim`` in the generated ``__init__``
    use_local = True
    use_neighbour = False
    use_global = False

    enc_dim: int
    n_genes: int

    def __post_init__(self) -> None:
        for name in ("enc_dim", "n_genes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")

    @property
    def scales(self) -> tuple[str, ...]:
        """Names of the image scales the method reads, in token order (a subset of local, neighbour, global)."""
        return tuple(s for s in SCALES if getattr(self, f"use_{s}"))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Build from a dict (e.g. a saved model's JSON); unknown keys are a TypeError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"Unknown {cls.__name__} fields: {unknown}.")
        return cls(**d)

    #: Values of fields added after models were first saved that reproduce those models' behaviour,
    #: where today's default differs (read by ``from_saved``).
    SAVED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_saved(cls, d: Mapping[str, Any]) -> Any:
        """Rebuild a saved model's config: :meth:`from_dict`, a field it lacks taking its :attr:`SAVED_DEFAULTS` value."""
        return cls.from_dict({**cls.SAVED_DEFAULTS, **d})

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)

    def for_training(self, train: Sequence[SlideTensors]) -> Any:
        """The config to build the module with for these training slides (default: unchanged).

        A method whose module size depends on the data (e.g. BLEEP's reference bank of all training
        spots) returns a copy with that field filled in.
        """
        return self


@dataclass(frozen=True)
class TrainedConfig(MethodConfig):
    """A :class:`~genedml_sd.model.MethodConfig` with the optimiser fields of the gradient-trained methods.

    Attributes
    ----------
    lr, weight_decay
        Learning rate and weight decay of the module's optimiser (Adam unless the module picks another).
    step_size, gamma, lr_interval
        StepLR schedule: the learning rate is multiplied by ``gamma`` every ``step_size`` units of
        ``lr_interval``, ``"epoch"`` (the paper's "decayed by 0.95 every 20 epochs": over 100 epochs the rate
        only falls to 0.77 of its start) or ``"step"`` (optimiser steps: with a few thousand spots per
        epoch, 20 steps are a few epochs, so the rate falls much faster).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 20
    gamma: float = 0.95
    lr_interval: str = "epoch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}.")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}.")
        if self.lr_interval not in ("epoch", "step"):
            raise ValueError(f"lr_interval must be 'epoch' or 'step', got {self.lr_interval!r}.")


# ====================================================================================== losses
@dataclass(frozen=True, eq=False)
class LossOutput(Mapping):
    """The loss of one training batch: the total that is minimised and its named parts.

    Read-only mapping over ``"total"`` and the parts (so ``out["pred"]``, ``set(out)`` work). The
    training plan logs ``train/total``, every part as ``train/<name>`` and every ``extra`` value the
    same way (epoch means); ``extra`` holds monitored values that are not loss terms (e.g. a learned
    temperature).

    Attributes
    ----------
    total
        Scalar tensor to minimise.
    parts
        Named scalar loss terms (need not sum to ``total``: weights may apply).
    extra
        Named scalars logged but not part of the loss.
    """

    total: torch.Tensor
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = {"total"} & (set(self.parts) | set(self.extra)) or set(self.parts) & set(self.extra)
        if clash:
            raise ValueError(f"LossOutput names must be unique and not 'total', got {sorted(clash)} twice.")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "total":
            return self.total
        return self.parts[name]

    def __iter__(self) -> Iterator[str]:
        yield "total"
        yield from self.parts

    def __len__(self) -> int:
        return 1 + len(self.parts)

    def logged(self) -> dict[str, torch.Tensor]:
        """Everything logged as ``train/<name>``: total, parts, extra (in that order)."""
        return {"total": self.total, **self.parts, **self.extra}


# ====================================================================================== module
class SlideModule(nn.Module):
    """Base of every method's torch module.

    Provides the feature standardisation buffers ``feature_mean`` / ``feature_std`` (D,), the output
    bias set-up, and one chunked :meth:`predict_slide`. A new method implements:

    * ``__init__(config)``: call ``super().__init__(config)`` first, then build the layers;
    * :meth:`predict_batch` (required): (B, G) predictions from standardised-input batches;
    * :meth:`training_loss` (gradient-trained methods): a :class:`LossOutput` for one :class:`SpotBatch`;
    * optionally :attr:`output_bias`, :meth:`prepare`, :meth:`slide_context`, :meth:`encode_slide`,
      :meth:`on_validation_start`, :meth:`on_fit_end`, :meth:`configure_optimizer`.

    Parameters
    ----------
    config
        The method's :class:`~genedml_sd.model.MethodConfig`; kept as ``self.config``.
    """

    #: Optimiser class used by :meth:`configure_optimizer` (called as ``cls(params, lr=, weight_decay=)``).
    optimizer_cls: ClassVar[Callable[..., torch.optim.Optimizer]] = torch.optim.Adam
    feature_mean: torch.Tensor  # buffers (D,), registered in __init__
    feature_std: torch.Tensor

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.enc_dim))
        self.register_buffer("feature_std", torch.ones(config.enc_dim))

    # ------------------------------------------------------------------------------ set-up
    def set_feature_stats(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Set the per-dimension standardisation of the frozen features (training statistics), (D,) each.

        ``std`` is clamped to at least 1e-6 (constant feature dimensions).
        """
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - feature_mean) / feature_std`` in float32, for features (..., D)."""
        return (x.float() - self.feature_mean) / self.feature_std

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The bias (G,) of the layer that outputs expression, if the method has one (default ``None``)."""
        return None

    def set_output_bias(self, mean_expression: torch.Tensor | np.ndarray) -> None:
        """Initialise the output bias to the mean training expression (G,), so training starts at the mean."""
        bias = self.output_bias
        if bias is None:
            raise TypeError(f"{type(self).__name__} has no output bias.")
        with torch.no_grad():
            bias.copy_(torch.as_tensor(np.asarray(mean_expression), dtype=torch.float32))

    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Fit the data-dependent state before training, from the training slides.

        Default: feature statistics (float32 mean and unbiased std over all training spots) and, if the
        method has one, the output bias (float32 mean training expression).
        """
        feats = torch.cat([s.local for s in train])
        self.set_feature_stats(feats.mean(0), feats.std(0))
        if self.output_bias is not None:
            self.set_output_bias(torch.cat([targets(s) for s in train]).mean(0))

    # ------------------------------------------------------------------------------ training hooks
    def slide_context(self, slide: SlideTensors) -> Any:
        """Static per-slide training context, computed once per training slide (default ``None``).

        Passed to :meth:`training_loss` as ``batch.context`` (e.g. NH2ST's spot neighbourhoods).
        """
        return None

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        """The loss of one batch of spots of one slide (gradient-trained methods implement this)."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by gradient descent (no training_loss).")

    def on_validation_start(self) -> None:
        """Called before every validation, in eval mode (e.g. BLEEP rebuilds its reference bank)."""

    def on_fit_end(self) -> None:
        """Called once after training, with the best epoch's weights restored (e.g. BLEEP's final bank)."""

    def select_on_validation(self, val: Sequence[SlideTensors]) -> dict[str, Any]:
        """Choices made on the validation slides once training ends, after :meth:`on_fit_end` (default none).

        E.g. Gene-DML's ``predictor="auto"``. Returns what was chosen (recorded with the training run).
        """
        return {}

    def configure_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """Optimiser and scheduler: :attr:`optimizer_cls` + StepLR from the config fields.

        Returns
        -------
        ``(optimizer, scheduler)``; the training plan steps the scheduler once per epoch, or once per
        optimiser step with ``config.lr_interval="step"`` (``None``: constant rate).
        """
        cfg = cast(TrainedConfig, self.config)  # the optimiser fields of a gradient-trained method's config
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)

    # ------------------------------------------------------------------------------ inference
    def encode_slide(self, local_all: torch.Tensor, coords_um: torch.Tensor) -> Any:
        """Per-spot slide-level context for prediction (default ``None``).

        Computed once per slide by :meth:`predict_slide` and handed to :meth:`predict_batch` in row
        chunks: anything indexable by a row slice, e.g. an (N, ...) tensor on the module's device or
        Gene-DML's :class:`~genedml_sd.model.SlideContext`, which computes each chunk's rows when asked.
        """
        return None

    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted log-normalised expression (B, G) of B spots.

        Parameters
        ----------
        local
            Local features (B, D), float32 on the module's device (not standardised).
        neighbour
            Neighbour-grid features (B, n_neighbours, D) if ``config.use_neighbour``, else ``None``.
        slide_rows
            The rows of :meth:`encode_slide` for these spots, or ``None``.
        """
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the module's buffers."""
        return self.feature_mean.device

    def predict_slide(
        self,
        local_all: torch.Tensor | np.ndarray,
        coords_um: torch.Tensor | np.ndarray,
        neighbour_all: Any = None,
        *,
        batch_size: int = 1024,
    ) -> torch.Tensor:
        """Predict all N spots of one slide, in eval mode (the training mode is restored afterwards).

        Parameters
        ----------
        local_all
            Local features (N, D), a tensor on any device or a numpy array.
        coords_um
            Spot centres in µm (N, 2); used by methods with slide-level context.
        neighbour_all
            Neighbour-grid features (N, n_neighbours, D) if the method reads them (ignored otherwise): a
            tensor, a numpy array (e.g. a read-only memory-mapped feature cache) or a
            :class:`~genedml_sd.model.TokenGrid`. It stays on the host; chunks of ``batch_size`` rows are
            gathered, converted to float32 and moved one at a time, so memory grows with ``batch_size``, not N.
        batch_size
            Spots per forward pass.

        Returns
        -------
        (N, G) float32 predicted log-normalised expression on the module's device (for 10^6 spots, fill
        a host array from :meth:`iter_predictions` instead).
        """
        out = [p for _, p in self.iter_predictions(local_all, coords_um, neighbour_all, batch_size=batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.n_genes, device=self.device)

    def iter_predictions(
        self,
        local_all: torch.Tensor | np.ndarray,
        coords_um: torch.Tensor | np.ndarray,
        neighbour_all: Any = None,
        *,
        batch_size: int = 1024,
        order: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Predictions of a slide in chunks ``(rows (b,) int64, (b, G) float32 on the device)``.

        Arguments of :meth:`predict_slide`; ``order`` (a permutation of the N rows) sets the order in
        which rows are batched, e.g. grouped by lattice tile so identical neighbour grids share a batch.
        The slide context (:meth:`encode_slide`) is computed once; no gradients, eval mode (then restored).
        """
        d = self.config.enc_dim
        if len(local_all.shape) != 2 or local_all.shape[1] != d:
            raise ValueError(f"local_all must be (N, {d}), got {tuple(local_all.shape)}.")
        n = local_all.shape[0]
        uses_neighbour = bool(self.config.use_neighbour)
        if uses_neighbour and neighbour_all is None:
            raise ValueError(f"{type(self).__name__} reads neighbour features: pass neighbour_all (N, T, D).")
        neighbour_used = neighbour_all if uses_neighbour else None
        if neighbour_used is not None and neighbour_used.shape[0] != n:
            raise ValueError(f"neighbour_all has {neighbour_used.shape[0]} rows for {n} spots.")
        if order is not None and (len(order) != n or not np.array_equal(np.sort(order), np.arange(n))):
            raise ValueError(f"order must be a permutation of the {n} rows.")
        dev = self.device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                context = self.encode_slide(_as_tensor(local_all), _as_tensor(coords_um)) if n else None
            for s in range(0, n, batch_size):
                rows: Any = slice(s, s + batch_size)
                if order is not None:
                    rows = np.sort(order[s : s + batch_size])
                with torch.no_grad():
                    nb = None if neighbour_used is None else host_batch(neighbour_used[rows], dev)
                    glob = None if context is None else context[torch.as_tensor(rows) if order is not None else rows]
                    pred = self.predict_batch(host_batch(local_all[rows], dev), nb, glob).float()
                yield (np.arange(n)[rows] if order is None else rows), pred
        finally:
            self.train(was_training)


# ====================================================================================== helpers
def host_batch(batch: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """One batch of host features (tensor or numpy array, e.g. a read-only memmap slice) as float32 on ``device``."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.from_numpy(np.array(batch, dtype=np.float32))
    return batch.to(device).float()


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def check_slides(train: Sequence[SlideTensors], val: Sequence[SlideTensors] | None, config: MethodConfig) -> None:
    """Check that training / validation slides fit a config: expression present, widths, neighbour features.

    Raises
    ------
    ValueError
        Naming the slide at fault.
    """
    if not train:
        raise ValueError("No training slides.")
    for s in [*train, *(val or [])]:
        if s.expr is None:
            raise ValueError(f"Slide {s.name!r} has no expression targets.")
        if s.expr.shape[1] != config.n_genes or s.local.shape[1] != config.enc_dim:
            raise ValueError(
                f"Slide {s.name!r} has {s.expr.shape[1]} genes / {s.local.shape[1]}-d features, the config "
                f"expects {config.n_genes} / {config.enc_dim}."
            )
        if config.use_neighbour and s.neighbour is None:
            raise ValueError(f"Slide {s.name!r} has no neighbour features but use_neighbour=True.")
    if sum(s.n_spots for s in train) < 2:
        raise ValueError("Need at least 2 training spots.")


def feature_stats_float64(slides: Sequence[SlideTensors], chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and unbiased std (D,) of the local features over all spots, in float64 (row chunks)."""
    n = sum(s.n_spots for s in slides)
    mean = tensor_sum(c.sum(0) for s in slides for c in float64_rows(s.local, chunk=chunk)) / n
    var = tensor_sum((c - mean).square().sum(0) for s in slides for c in float64_rows(s.local, chunk=chunk))
    return mean, (var / max(n - 1, 1)).sqrt()


def expression_mean_float64(slides: Sequence[SlideTensors]) -> torch.Tensor:
    """Mean expression (G,) over all spots, float64."""
    n = sum(s.n_spots for s in slides)
    return tensor_sum(targets(s).double().sum(0) for s in slides) / n


def targets(slide: SlideTensors) -> torch.Tensor:
    """The expression (N, G) of a slide that has some (training / validation slides, see :func:`check_slides`)."""
    assert slide.expr is not None, f"slide {slide.name!r} has no expression targets"
    return slide.expr


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Built-in ``sum`` of tensors (``0 + t0 + t1 + ...``), typed as a tensor (the terms must not be empty)."""
    return cast(torch.Tensor, sum(terms))


def float64_rows(x: torch.Tensor, device: torch.device | str = "cpu", chunk: int = 16384) -> Iterator[torch.Tensor]:
    """Float64 row chunks of a (N, ...) tensor on ``device`` (bounds the float64 copies' memory)."""
    for s in range(0, x.shape[0], chunk):
        yield x[s : s + chunk].to(device, torch.float64)


def check_local_only(config: MethodConfig) -> None:
    """Refuse scale switches other than local-only (for methods that read only the local-tile features)."""
    if not config.use_local or config.use_neighbour or config.use_global:
        raise ValueError(
            f"{type(config).__name__} uses the local-tile features only: use_local=True, "
            "use_neighbour=False, use_global=False."
        )
