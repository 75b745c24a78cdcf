"""Baselines trained on the same cached local-tile features as Gene-DML, for side-by-side tables.

* ``ridge`` -- HEST-Benchmark-style linear probe: standardised features -> PCA -> ridge regression
  (closed form, float64): :class:`RidgeConfig`, :class:`RidgeRegressor`, :func:`fit_ridge`.
* ``mlp`` -- ST-Net-like head on the local features (no context, no contrastive loss):
  :class:`MLPConfig`, :class:`MLPRegressor`, :func:`train_mlp`.
* ``bleep`` -- BLEEP: contrastive image / expression embeddings, prediction by retrieving the most
  similar training spots: :class:`BLEEPConfig`, :class:`BLEEP`, :func:`train_bleep`.

Every baseline has the same interface as Gene-DML, so the package can swap methods (see
:data:`BASELINES`): a frozen config with ``enc_dim``, ``n_genes`` and the scale switches ``use_local``,
``use_neighbour``, ``use_global`` (always local only), ``to_dict`` / ``from_dict``; an ``nn.Module``
built from the config alone, whose fitted state lives in parameters and buffers, with
``predict_slide(local_all, coords_um, neighbour_all=None, *, batch_size)``; and a training function
``train(train, val, config, *, max_epochs, batch_size, seed, ...)`` returning an object with ``.model``,
``.history`` and ``.config`` (the config with training-time fields such as ``n_components`` or
``n_reference`` filled in).

This module imports only torch and numpy; Lightning is imported when training starts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._data import SlideTensors, SpotBatches
from ._losses import prediction_loss, soft_target_instance_loss

logger = logging.getLogger(__name__)

#: Default ridge penalties tried on the validation slides, per training spot (see :class:`RidgeConfig`).
RIDGE_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


# ================================================================================== configs
class _ConfigIO:
    """``to_dict`` / ``from_dict`` / ``replace`` and shared checks of the baseline configs."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"Unknown {cls.__name__} fields: {unknown}.")
        return cls(**d)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def scales(self) -> tuple[str, ...]:
        """Names of the scales in use (always ``("local",)`` for the baselines)."""
        return ("local",)

    def _check_common(self) -> None:
        if not self.use_local or self.use_neighbour or self.use_global:
            raise ValueError(
                f"{type(self).__name__} uses the local-tile features only: use_local=True, "
                "use_neighbour=False, use_global=False."
            )
        for name in ("enc_dim", "n_genes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


@dataclass(frozen=True)
class RidgeConfig(_ConfigIO):
    """Hyper-parameters of :class:`RidgeRegressor` (HEST-Benchmark linear probe).

    The fit minimises, over the PCA scores ``s`` of the standardised features::

        (1 / n) * sum_i ||y_i - s_i W - b||^2 + alpha * ||W||_F^2

    i.e. scikit-learn's ``Ridge(alpha=n * alpha)``, with an unpenalised intercept ``b``.

    Attributes
    ----------
    enc_dim
        Width D of the frozen encoder's features.
    n_genes
        Number of predicted genes G.
    n_components
        PCA components kept; training sets it to ``min(n_components, n_train_spots, D)``.
    alpha
        Ridge penalty per training spot (see above). ``None``: chosen on the validation slides from
        ``alphas`` (best mean per-gene PCC, ties to the smaller alpha); without validation slides, HEST-Benchmark's rule
        ``100 / (n_components * n_genes)`` on scikit-learn's sum-of-squares objective, i.e.
        ``100 / (n_components * n_genes * n_train_spots)`` here. Training fills in the value used.
    alphas
        Grid of per-spot penalties searched when ``alpha`` is ``None`` and validation slides are given.
        The PCA component of variance ``lambda`` is shrunk by ``lambda / (lambda + alpha)``; standardised
        features have total variance D, so the grid spans no shrinkage to shrinking all but the
        leading components away.
    use_local, use_neighbour, use_global
        Scale switches, fixed to local only (read by the package to skip neighbour features).
    """

    enc_dim: int
    n_genes: int
    n_components: int = 256
    alpha: float | None = None
    alphas: tuple[float, ...] = RIDGE_ALPHAS
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        self._check_common()
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}.")
        if self.alpha is not None and not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}.")
        if not self.alphas or any(not a >= 0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty grid of values >= 0, got {self.alphas}.")


@dataclass(frozen=True)
class MLPConfig(_ConfigIO):
    """Hyper-parameters of :class:`MLPRegressor` (ST-Net-like head) and its training.

    Attributes
    ----------
    enc_dim
        Width D of the frozen encoder's features.
    n_genes
        Number of predicted genes G.
    hidden
        Hidden width of the head.
    dropout
        Dropout after the hidden layer.
    lr, weight_decay
        Adam learning rate and weight decay.
    step_size, gamma
        StepLR schedule (epochs, factor).
    use_local, use_neighbour, use_global
        Scale switches, fixed to local only.
    """

    enc_dim: int
    n_genes: int
    hidden: int = 512
    dropout: float = 0.1
    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 20
    gamma: float = 0.95
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


@dataclass(frozen=True)
class BLEEPConfig(_ConfigIO):
    """Hyper-parameters of :class:`BLEEP` and its training.

    Attributes
    ----------
    enc_dim
        Width D of the frozen encoder's features.
    n_genes
        Number of predicted genes G.
    dim
        Width of the image and expression embeddings (256 in BLEEP).
    dropout
        Dropout in the projection heads.
    tau
        Fixed temperature of the soft-target contrastive loss on L2-normalised embeddings, and of the
        ``"weighted"`` aggregation. BLEEP uses temperature 1 on *un-normalised* LayerNorm outputs
        (norm about ``sqrt(dim)``), which is a much sharper softmax than temperature 1 on cosine
        similarities; 0.07 (CLIP's, and Gene-DML's initial value) is used instead.
    top_k
        Number of retrieved training spots per query (50 in BLEEP).
    aggregate
        ``"mean"``: plain mean expression of the ``top_k`` retrieved spots (BLEEP's default);
        ``"weighted"``: weights ``softmax(cos / tau)`` over the retrieved spots.
    n_reference
        Size of the reference bank (all training spots); set by :func:`train_bleep`.
    lr, weight_decay
        AdamW learning rate and weight decay (BLEEP: 1e-3, 1e-3).
    step_size, gamma
        StepLR schedule (epochs, factor); ``gamma=1`` keeps the rate constant, as in BLEEP.
    use_local, use_neighbour, use_global
        Scale switches, fixed to local only.
    """

    enc_dim: int
    n_genes: int
    dim: int = 256
    dropout: float = 0.1
    tau: float = 0.07
    top_k: int = 50
    aggregate: str = "mean"
    n_reference: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-3
    step_size: int = 20
    gamma: float = 1.0
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        for name in ("dim", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_reference < 0:
            raise ValueError(f"n_reference must be >= 0, got {self.n_reference}.")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")
        if self.aggregate not in ("mean", "weighted"):
            raise ValueError(f"aggregate must be 'mean' or 'weighted', got {self.aggregate!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


# ================================================================================== modules
class _LocalBaseline(nn.Module):
    """Shared parts: feature standardisation buffers and slide prediction in chunks of spots."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.enc_dim))
        self.register_buffer("feature_std", torch.ones(config.enc_dim))

    def set_feature_stats(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Set the per-dimension standardisation of the frozen features (training statistics), (D,)."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def predict_slide(
        self,
        local_all: torch.Tensor,
        coords_um: torch.Tensor,
        neighbour_all: torch.Tensor | None = None,
        *,
        batch_size: int = 1024,
    ) -> torch.Tensor:
        """Predict all spots of one slide from their local features.

        The module is evaluated in eval mode (no dropout); its training mode is restored afterwards.

        Parameters
        ----------
        local_all
            Local features (N, D) (on any device; moved to the model's in chunks).
        coords_um
            Spot centres in µm (N, 2); unused (the baselines have no spatial context).
        neighbour_all
            Ignored (the baselines use no neighbour features).
        batch_size
            Spots per forward pass (for BLEEP: queries per retrieval chunk).

        Returns
        -------
        (N, G) predicted log-normalised expression, float32 on the model's device.
        """
        if local_all.ndim != 2 or local_all.shape[1] != self.config.enc_dim:
            raise ValueError(f"local_all must be (N, {self.config.enc_dim}), got {tuple(local_all.shape)}.")
        dev = self.feature_mean.device
        was_training = self.training
        self.eval()
        try:
            out = [
                self(local_all[s : s + batch_size].to(dev)).float() for s in range(0, local_all.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.config.n_genes, device=dev)


class RidgeRegressor(_LocalBaseline):
    """Linear probe: ``((x - mean) / std) @ components @ weight + bias``.

    Buffers (all fitted by :func:`fit_ridge`): ``feature_mean``, ``feature_std`` (D,), ``components``
    (D, n_components) PCA loadings of the standardised training features (columns by decreasing
    variance), ``weight`` (n_components, G) and ``bias`` (G,).
    """

    def __init__(self, config: RidgeConfig) -> None:
        super().__init__(config)
        k, g = config.n_components, config.n_genes
        self.register_buffer("components", torch.zeros(config.enc_dim, k))
        self.register_buffer("weight", torch.zeros(k, g))
        self.register_buffer("bias", torch.zeros(g))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D)."""
        return self._standardise(local) @ self.components @ self.weight + self.bias


class MLPRegressor(_LocalBaseline):
    """ST-Net-like head: standardise -> ``Linear(D, hidden)`` -> GELU -> Dropout -> ``Linear(hidden, G)``.

    The output bias starts at the mean training expression (:meth:`set_output_bias`).
    """

    optimizer_cls = torch.optim.Adam

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(config.enc_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.n_genes),
        )

    def set_output_bias(self, mean_expression: torch.Tensor | np.ndarray) -> None:
        """Initialise the output bias to the mean training expression (G,)."""
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.as_tensor(np.asarray(mean_expression), dtype=torch.float32))

    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Set the feature statistics and the output bias from the training slides."""
        mean, std = _feature_stats(train)
        self.set_feature_stats(mean, std)
        self.set_output_bias(_expression_mean(train))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D)."""
        return self.net(self._standardise(local))

    def training_loss(self, local: torch.Tensor, expr: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE of a batch: ``{"total", "pred"}`` (scalars)."""
        loss = prediction_loss(self(local), expr)
        return {"total": loss, "pred": loss}


class ProjectionHead(nn.Module):
    """BLEEP / CLIP projection head: ``p = Linear(in, dim)(x)``; ``LayerNorm(p + Dropout(Linear(GELU(p))))``.

    Parameters
    ----------
    in_dim
        Input width.
    dim
        Embedding width.
    dropout
        Dropout on the residual branch.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed (B, in_dim) -> (B, dim)."""
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(F.gelu(p))))


class BLEEP(_LocalBaseline):
    """BLEEP: contrastive image / expression embeddings and prediction by retrieval.

    * image head: standardised local features (B, D) -> :class:`ProjectionHead` -> (B, dim);
    * expression head: log-normalised expression (B, G) -> :class:`ProjectionHead` -> (B, dim);
    * training: :func:`~genedml_sd.model.soft_target_instance_loss` between the two (fixed ``tau``);
    * prediction: the query spot's image embedding is compared (cosine similarity) with the
      *expression* embeddings of all training spots (the reference bank), and the prediction is the
      mean (or ``softmax(cos / tau)``-weighted mean) expression of the ``top_k`` most similar ones.

    The reference bank is two buffers sized by ``config.n_reference``: ``ref_embedding``
    (n_reference, dim), L2-normalised expression embeddings, and ``ref_expr`` (n_reference, G), the
    training expression; so a module rebuilt from its config predicts alone after ``load_state_dict``.
    Queries are processed in chunks (``predict_slide``'s ``batch_size``), so at most
    ``batch_size x n_reference`` similarities exist at once.
    """

    optimizer_cls = torch.optim.AdamW

    def __init__(self, config: BLEEPConfig) -> None:
        super().__init__(config)
        self.image_head = ProjectionHead(config.enc_dim, config.dim, config.dropout)
        self.gene_head = ProjectionHead(config.n_genes, config.dim, config.dropout)
        self.register_buffer("ref_embedding", torch.zeros(config.n_reference, config.dim))
        self.register_buffer("ref_expr", torch.zeros(config.n_reference, config.n_genes))

    def embed_image(self, local: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, dim) of local features (B, D) (not normalised)."""
        return self.image_head(self._standardise(local))

    def embed_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression embeddings (B, dim) of log-normalised expression (B, G) (not normalised)."""
        return self.gene_head(expr.float())

    def training_loss(self, local: torch.Tensor, expr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft-target contrastive loss of a batch: ``{"total", "instance"}`` (scalars)."""
        loss = soft_target_instance_loss(self.embed_image(local), self.embed_expression(expr), self.config.tau)
        return {"total": loss, "instance": loss}

    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Set the feature statistics and the reference expression from the training slides."""
        mean, std = _feature_stats(train)
        self.set_feature_stats(mean, std)
        expr = torch.cat([s.expr for s in train]).float()
        if expr.shape[0] != self.config.n_reference:
            raise ValueError(f"{expr.shape[0]} training spots, but config.n_reference={self.config.n_reference}.")
        self.ref_expr.copy_(expr)

    @torch.no_grad()
    def build_reference(self, batch_size: int = 4096) -> None:
        """Recompute ``ref_embedding`` from ``ref_expr`` with the current expression head (eval mode)."""
        was_training = self.training
        self.eval()
        dev = self.ref_expr.device
        try:
            with torch.autocast(device_type=dev.type, enabled=False):
                for s in range(0, self.config.n_reference, batch_size):
                    emb = self.embed_expression(self.ref_expr[s : s + batch_size])
                    self.ref_embedding[s : s + batch_size] = F.normalize(emb.float(), dim=1)
        finally:
            self.train(was_training)

    def set_reference(self, embedding: torch.Tensor, expr: torch.Tensor) -> None:
        """Set the reference bank by hand: embeddings (n_reference, dim) (normalised here), expression (n_reference, G)."""
        self.ref_embedding.copy_(F.normalize(torch.as_tensor(embedding, dtype=torch.float32), dim=1))
        self.ref_expr.copy_(torch.as_tensor(expr, dtype=torch.float32))

    def retrieve(self, query: torch.Tensor) -> torch.Tensor:
        """Predict expression (B, G) from query image embeddings (B, dim) by top-k retrieval."""
        cfg = self.config
        if cfg.n_reference == 0:
            raise RuntimeError("BLEEP has an empty reference bank (n_reference=0); train it first.")
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = F.normalize(query.float(), dim=1)
            sims = q @ self.ref_embedding.T
            top, idx = sims.topk(min(cfg.top_k, cfg.n_reference), dim=1)
            neighbours = self.ref_expr[idx]  # (B, k, G)
            if cfg.aggregate == "mean":
                return neighbours.mean(dim=1)
            w = torch.softmax(top / cfg.tau, dim=1)
            return (w.unsqueeze(-1) * neighbours).sum(dim=1)

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D) by retrieval."""
        return self.retrieve(self.embed_image(local))


# ================================================================================== helpers
def _check_slides(train: Sequence[SlideTensors], val: Sequence[SlideTensors] | None, config: Any) -> None:
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
    if sum(s.n_spots for s in train) < 2:
        raise ValueError("Need at least 2 training spots.")


def _rows(x: torch.Tensor, dev: torch.device, chunk: int = 16384) -> Iterator[torch.Tensor]:
    """Float64 row chunks of a (N, ...) tensor on ``dev`` (bounds the float64 copies' memory)."""
    for s in range(0, x.shape[0], chunk):
        yield x[s : s + chunk].to(dev, torch.float64)


def _feature_stats(slides: Sequence[SlideTensors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) std (D,) of the local features over all spots, float64."""
    dev = torch.device("cpu")
    n = sum(s.n_spots for s in slides)
    mean = sum(c.sum(0) for s in slides for c in _rows(s.local, dev)) / n
    var = sum((c - mean).square().sum(0) for s in slides for c in _rows(s.local, dev)) / max(n - 1, 1)
    return mean, var.sqrt()


def _expression_mean(slides: Sequence[SlideTensors]) -> torch.Tensor:
    n = sum(s.n_spots for s in slides)
    return sum(s.expr.double().sum(0) for s in slides) / n


def _device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# ================================================================================== ridge
@dataclass
class RidgeFit:
    """Result of :func:`fit_ridge`.

    Attributes
    ----------
    model
        The fitted :class:`RidgeRegressor` (CPU, eval mode).
    config
        Its config, with ``n_components`` and ``alpha`` filled in.
    history
        One row: ``train/total`` (= ``train/pred``, training MSE), ``alpha``, and with validation
        slides ``val/pcc``, ``val/mse``.
    alpha_scores
        Mean validation PCC per candidate alpha (empty without validation or with a fixed alpha).
    best_epoch
        Always 0 (closed-form fit).
    """

    model: RidgeRegressor
    config: RidgeConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    alpha_scores: dict[float, float] = field(default_factory=dict)
    best_epoch: int = 0


def fit_ridge(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: RidgeConfig,
    *,
    max_epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    patience: int = 10,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> RidgeFit:
    """Fit the ridge-on-PCA linear probe (HEST-Benchmark protocol) in closed form.

    Steps, all on training spots only and in float64: per-dimension standardisation; PCA by
    eigen-decomposition of the correlation matrix (accumulated slide by slide, so no (n, D) float64
    copy exists; eigenvector signs fixed so each column's largest entry is positive, hence
    deterministic); ridge regression of the G genes on the PCA scores with an unpenalised intercept
    (the scores' covariance is diagonal, so every alpha costs one division). The penalty is
    ``config.alpha`` if set; otherwise the grid value with the best mean validation PCC, or
    HEST's default without validation slides (see :class:`RidgeConfig`).

    Parameters
    ----------
    train, val
        Slides with features and expression.
    config
        Probe configuration (``enc_dim``, ``n_genes`` must match the slides).
    accelerator
        ``"auto"`` / ``"gpu"`` / ``"cuda"`` compute on CUDA when available, otherwise on the CPU.
    max_epochs, batch_size, seed, devices, strategy, precision, patience, checkpoint_dir, progress, trainer_kwargs
        Ignored (accepted for the common training interface).

    Returns
    -------
    :class:`RidgeFit` with ``.model``, ``.config``, ``.history``, ``.alpha_scores``.
    """
    _check_slides(train, val, config)
    from ._lightning import mean_gene_pcc  # the metric of every method's val/pcc

    dev = _device(accelerator)
    f64 = torch.float64
    n = sum(s.n_spots for s in train)
    d, g = config.enc_dim, config.n_genes
    k = min(config.n_components, n, d)

    # pass 1: means; pass 2: centred second moments
    mean64 = sum(c.sum(0) for s in train for c in _rows(s.local, dev)) / n
    ybar = sum(c.sum(0) for s in train for c in _rows(s.expr, dev)) / n
    cxx = torch.zeros(d, d, dtype=f64, device=dev)
    cxy = torch.zeros(d, g, dtype=f64, device=dev)
    for s in train:
        for x, y in zip(_rows(s.local, dev), _rows(s.expr, dev), strict=True):
            xc = x - mean64
            cxx += xc.T @ xc
            cxy += xc.T @ (y - ybar)
    std64 = (cxx.diagonal() / max(n - 1, 1)).sqrt()
    # the stored (float32) statistics define the standardisation u = (x - m32) / s32 used at prediction
    m32 = mean64.float().double()
    s32 = std64.float().clamp_min(1e-6).double()
    cuu = cxx / (s32[:, None] * s32[None, :]) / n  # covariance of u
    cuy = cxy / s32[:, None] / n
    ubar = (mean64 - m32) / s32

    evals, evecs = torch.linalg.eigh(cuu)
    evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    pivot = evecs.abs().argmax(dim=0)
    evecs = evecs * torch.sign(evecs[pivot, torch.arange(k, device=dev)])[None, :]
    proj_cov = evecs.T @ cuy  # (k, G): covariance of the scores with y
    score_bar = ubar @ evecs
    tol = max(float(evals.max()), 1.0) * d * torch.finfo(f64).eps

    def solve(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        denom = evals + alpha
        inv = torch.where(denom > tol, 1.0 / denom.clamp_min(tol), torch.zeros_like(denom))
        w = inv[:, None] * proj_cov
        return w, ybar - score_bar @ w

    def scores(slide: SlideTensors) -> torch.Tensor:
        return torch.cat([((x - m32) / s32) @ evecs for x in _rows(slide.local, dev)])

    def evaluate(w: torch.Tensor, b: torch.Tensor, val_scores: list[torch.Tensor]) -> tuple[float, float]:
        pccs, mses = [], []
        for sc, slide in zip(val_scores, val or [], strict=True):
            pred = sc @ w + b
            target = slide.expr.to(dev, f64)
            pccs.append(float(mean_gene_pcc(pred, target)))
            mses.append(float(F.mse_loss(pred, target)))
        return float(np.mean(pccs)), float(np.mean(mses))

    val_scores = [scores(s) for s in val or []]
    alpha_scores: dict[float, float] = {}
    if config.alpha is not None:
        alpha = float(config.alpha)
    elif val:
        for a in config.alphas:
            alpha_scores[a] = evaluate(*solve(a), val_scores)[0]
        finite = {a: p for a, p in alpha_scores.items() if np.isfinite(p)}
        alpha = max(finite, key=finite.get) if finite else float(config.alphas[0])
        logger.info("Ridge: alpha=%g chosen on validation (val/pcc by alpha: %s)", alpha, alpha_scores)
    else:
        alpha = 100.0 / (k * g * n)
    w, b = solve(alpha)

    cfg = config.replace(n_components=k, alpha=alpha)
    model = RidgeRegressor(cfg)
    model.set_feature_stats(m32.float().cpu(), s32.float().cpu())
    model.components.copy_(evecs.float().cpu())
    model.weight.copy_(w.float().cpu())
    model.bias.copy_(b.float().cpu())
    model.eval()

    sse = sum(float((scores(s) @ w + b - s.expr.to(dev, f64)).square().sum()) for s in train)
    row: dict[str, Any] = {"epoch": 0, "train/total": sse / (n * g), "train/pred": sse / (n * g), "alpha": alpha}
    if val:
        row["val/pcc"], row["val/mse"] = evaluate(w, b, val_scores)
    return RidgeFit(model=model, config=cfg, history=[row], alpha_scores=alpha_scores)


# ================================================================================== Lightning training
@functools.cache
def _lit_class() -> type:
    """The LightningModule class for per-spot local-feature baselines (built on first use)."""
    import lightning.pytorch as pl

    from ._lightning import mean_gene_pcc

    class LitLocalBaseline(pl.LightningModule):
        """Trains a per-spot local-feature baseline (:class:`MLPRegressor`, :class:`BLEEP`) on slides.

        The model provides ``prepare(train)``, ``training_loss(local, expr)``, ``predict_slide`` and
        ``optimizer_cls``; a model with ``build_reference`` gets its reference bank rebuilt before
        every validation.
        """

        def __init__(
            self,
            model: nn.Module,
            train: Sequence[SlideTensors],
            val: Sequence[SlideTensors] | None = None,
            *,
            batch_size: int = 256,
            seed: int = 0,
        ) -> None:
            super().__init__()
            self.model = model
            self.config = model.config
            self.train_slides = list(train)
            self.val_slides = list(val or [])
            self.batch_size = batch_size
            self.seed = seed
            self.batches = SpotBatches([s.n_spots for s in self.train_slides], batch_size, seed)
            self.history: list[dict[str, Any]] = []
            self.best_epoch: int | None = None
            model.prepare(self.train_slides)

        def train_dataloader(self) -> Any:
            """Within-slide spot batches (indices only)."""
            from torch.utils.data import DataLoader

            return DataLoader(self.batches, batch_size=None, shuffle=False, num_workers=0)

        def val_dataloader(self) -> Any:
            """One item per validation slide."""
            from torch.utils.data import DataLoader

            return DataLoader(list(range(len(self.val_slides))), batch_size=None, shuffle=False)

        def on_train_epoch_start(self) -> None:
            """Reshuffle the batches for this epoch."""
            self.batches.set_epoch(self.current_epoch)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            """One batch of one slide: loss and logs."""
            slide = self.train_slides[int(batch["slide"])]
            idx = batch["index"].cpu()
            local = slide.local[idx].to(self.device, non_blocking=True)
            expr = slide.expr[idx].to(self.device, non_blocking=True)
            losses = self.model.training_loss(local, expr)
            for name, value in losses.items():
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(idx), sync_dist=True)
            return losses["total"]

        def on_validation_epoch_start(self) -> None:
            """Rebuild a retrieval model's reference bank with the current weights."""
            if hasattr(self.model, "build_reference"):
                self.model.build_reference()

        def validation_step(self, batch: int | torch.Tensor, batch_idx: int) -> None:
            """Predict a whole validation slide; log mean per-gene PCC and MSE."""
            slide = self.val_slides[int(batch)]
            pred = self.model.predict_slide(slide.local, slide.coords, batch_size=max(self.batch_size, 1024))
            target = slide.expr.to(pred.device)
            self.log("val/pcc", mean_gene_pcc(pred, target), batch_size=1, sync_dist=True)
            self.log("val/mse", F.mse_loss(pred, target), batch_size=1, sync_dist=True)

        def configure_optimizers(self) -> dict[str, Any]:
            """The model's optimiser (Adam / AdamW) + StepLR (per epoch)."""
            cfg = self.config
            opt = self.model.optimizer_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return LitLocalBaseline


def _train_local(
    make_model: Callable[[], nn.Module],
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    *,
    max_epochs: int,
    batch_size: int,
    seed: int,
    accelerator: str,
    devices: int | str,
    strategy: str,
    precision: str | None,
    patience: int,
    checkpoint_dir: str | Path | None,
    progress: bool,
    trainer_kwargs: dict[str, Any] | None,
) -> Any:
    """Lightning loop shared by the MLP and BLEEP (same protocol as ``train_gene_dml``)."""
    import lightning.pytorch as pl

    from ._lightning import fit_lightning

    pl.seed_everything(seed, workers=True, verbose=False)
    lit = _lit_class()(make_model(), train, val, batch_size=batch_size, seed=seed)
    lit = fit_lightning(
        lit,
        has_val=bool(val),
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        trainer_kwargs=trainer_kwargs,
    )
    if hasattr(lit.model, "build_reference"):
        lit.model.build_reference()
    lit.model.eval()
    return lit


def train_mlp(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: MLPConfig,
    *,
    max_epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    patience: int = 10,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Train the ST-Net-like MLP head with MSE (Adam + StepLR), like :func:`~genedml_sd.model.train_gene_dml`.

    With validation slides, training stops early when the validation mean per-gene PCC has not
    improved for ``patience`` epochs, and the best epoch's weights are restored.

    Parameters
    ----------
    train, val
        Slides with features and expression.
    config
        Head configuration (``enc_dim``, ``n_genes`` must match the slides).
    max_epochs, batch_size, seed
        Training length, spots per batch (within a slide), seed (weights, dropout, batches).
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer`.
    patience
        Early-stopping patience (epochs), only with validation.
    checkpoint_dir
        Where the best checkpoint is written (a temporary folder by default).
    progress
        Show Lightning's progress bar.
    trainer_kwargs
        Further :class:`~lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The trained LightningModule: ``.model`` (:class:`MLPRegressor`, eval mode), ``.config``,
    ``.history`` (``train/total``, ``train/pred``, ``val/pcc``, ``val/mse``, ``lr`` per epoch),
    ``.best_epoch``.
    """
    _check_slides(train, val, config)
    return _train_local(
        lambda: MLPRegressor(config),
        train,
        val,
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        trainer_kwargs=trainer_kwargs,
    )


def train_bleep(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: BLEEPConfig,
    *,
    max_epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    patience: int = 10,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Train BLEEP with the soft-target contrastive loss; the reference bank is all training spots.

    ``config.n_reference`` is set to the number of training spots. Validation predicts by retrieval
    against the bank rebuilt with the current weights; with validation slides, training stops early
    when the mean per-gene PCC has not improved for ``patience`` epochs and the best weights are
    restored. The bank is rebuilt once more at the end.

    Parameters
    ----------
    train, val
        Slides with features and expression.
    config
        BLEEP configuration (``enc_dim``, ``n_genes`` must match the slides).
    max_epochs, batch_size, seed
        Training length, spots per batch (within a slide; the in-batch negatives), seed.
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer`.
    patience
        Early-stopping patience (epochs), only with validation.
    checkpoint_dir
        Where the best checkpoint is written (a temporary folder by default).
    progress
        Show Lightning's progress bar.
    trainer_kwargs
        Further :class:`~lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The trained LightningModule: ``.model`` (:class:`BLEEP`, eval mode), ``.config`` (with
    ``n_reference``), ``.history`` (``train/total``, ``train/instance``, ``val/pcc``, ``val/mse``, ...),
    ``.best_epoch``.
    """
    _check_slides(train, val, config)
    cfg = config.replace(n_reference=sum(s.n_spots for s in train))
    return _train_local(
        lambda: BLEEP(cfg),
        train,
        val,
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        trainer_kwargs=trainer_kwargs,
    )


# ================================================================================== registry
class Baseline(NamedTuple):
    """A baseline method: its config class, module class and training function."""

    config: type
    module: type
    train: Callable[..., Any]


#: The baselines by method name.
BASELINES: dict[str, Baseline] = {
    "ridge": Baseline(RidgeConfig, RidgeRegressor, fit_ridge),
    "mlp": Baseline(MLPConfig, MLPRegressor, train_mlp),
    "bleep": Baseline(BLEEPConfig, BLEEP, train_bleep),
}
