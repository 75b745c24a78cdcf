"""Ridge baseline (``method="ridge"``): HEST-Benchmark-style linear probe on the local-tile features.

Standardised features -> PCA -> ridge regression, fitted in closed form in float64:
:class:`RidgeConfig`, :class:`~genedml_sd.model.RidgeRegressor`, :func:`~genedml_sd.model.fit_ridge`. Pure torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genedml_sd._docs import docs

from ._base import (
    MethodConfig,
    SlideModule,
    check_local_only,
    check_slides,
    float64_rows,
    targets,
    tensor_sum,
)
from ._data import SlideTensors
from ._losses import mean_gene_pcc
from ._options import TrainArgs, TrainResult

logger = logging.getLogger(__name__)

#: Default ridge penalties tried on the validation slides, per training spot (see :class:`RidgeConfig`).
RIDGE_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


@docs
@dataclass(frozen=True)
class RidgeConfig(MethodConfig):
    """Hyper-parameters of :class:`~genedml_sd.model.RidgeRegressor` (HEST-Benchmark linear probe).

    The fit minimises, over the PCA scores ``s`` of the standardised features::

        (1 / n) * sum_i ||y_i - s_i W - b||^2 + alpha * ||W||_F^2

    i.e. scikit-learn's ``Ridge(alpha=n * alpha)``, with an unpenalised intercept ``b``.

    Attributes
    ----------
    %(config_dims)s
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

    n_components: int = 256
    alpha: float | None = None
    alphas: tuple[float, ...] = RIDGE_ALPHAS
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        super().__post_init__()
        check_local_only(self)
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}.")
        if self.alpha is not None and not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}.")
        if not self.alphas or any(not a >= 0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty grid of values >= 0, got {self.alphas}.")


class RidgeRegressor(SlideModule):
    """Linear probe: ``((x - mean) / std) @ components @ weight + bias``.

    Buffers (all fitted by :func:`~genedml_sd.model.fit_ridge`): ``feature_mean``, ``feature_std`` (D,), ``components``
    (D, n_components) PCA loadings of the standardised training features (columns by decreasing
    variance), ``weight`` (n_components, G) and ``bias`` (G,).
    """

    components: torch.Tensor  # buffers, registered in __init__
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, config: RidgeConfig) -> None:
        super().__init__(config)
        k, g = config.n_components, config.n_genes
        self.register_buffer("components", torch.zeros(config.enc_dim, k))
        self.register_buffer("weight", torch.zeros(k, g))
        self.register_buffer("bias", torch.zeros(g))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D)."""
        return self.standardise(local) @ self.components @ self.weight + self.bias

    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted expression (B, G) from local features (B, D)."""
        return self(local)


@dataclass
class RidgeResult(TrainResult):
    """Result of :func:`~genedml_sd.model.fit_ridge`: a :class:`~genedml_sd.model.TrainResult` with the penalty search.

    ``history`` has one row: ``train/total`` (= ``train/pred``, training MSE), ``alpha``, and with
    validation slides ``val/pcc``, ``val/mse``; ``best_epoch`` is 0 (closed-form fit).

    Attributes
    ----------
    alpha_scores
        Mean validation PCC per candidate alpha (empty without validation or with a fixed alpha).
    """

    alpha_scores: dict[float, float] = field(default_factory=dict)


def fit_ridge(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: RidgeConfig,
    *,
    device: torch.device | str | None = None,
) -> RidgeResult:
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
    device
        Where to compute (float64); ``None``: CUDA when available, otherwise the CPU.

    Returns
    -------
    :class:`RidgeResult` with ``.module`` (CPU, eval mode), ``.config``, ``.history``, ``.alpha_scores``.
    """
    check_slides(train, val, config)
    dev = compute_device("auto") if device is None else torch.device(device)
    f64 = torch.float64
    n = sum(s.n_spots for s in train)
    d, g = config.enc_dim, config.n_genes
    k = min(config.n_components, n, d)

    # pass 1: means; pass 2: centred second moments
    mean64 = tensor_sum(c.sum(0) for s in train for c in float64_rows(s.local, dev)) / n
    ybar = tensor_sum(c.sum(0) for s in train for c in float64_rows(targets(s), dev)) / n
    cxx = torch.zeros(d, d, dtype=f64, device=dev)
    cxy = torch.zeros(d, g, dtype=f64, device=dev)
    for s in train:
        for x, y in zip(float64_rows(s.local, dev), float64_rows(targets(s), dev), strict=True):
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
        return torch.cat([((x - m32) / s32) @ evecs for x in float64_rows(slide.local, dev)])

    def evaluate(w: torch.Tensor, b: torch.Tensor, val_scores: list[torch.Tensor]) -> tuple[float, float]:
        pccs, mses = [], []
        for sc, slide in zip(val_scores, val or [], strict=True):
            pred = sc @ w + b
            target = targets(slide).to(dev, f64)
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
        alpha = max(finite, key=finite.__getitem__) if finite else float(config.alphas[0])
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

    sse = sum(float((scores(s) @ w + b - targets(s).to(dev, f64)).square().sum()) for s in train)
    row: dict[str, Any] = {"epoch": 0, "train/total": sse / (n * g), "train/pred": sse / (n * g), "alpha": alpha}
    if val:
        row["val/pcc"], row["val/mse"] = evaluate(w, b, val_scores)
    return RidgeResult(module=model, config=cfg, history=[row], best_epoch=0, alpha_scores=alpha_scores)


def fit_ridge_method(
    train: Sequence[SlideTensors], val: Sequence[SlideTensors] | None, config: RidgeConfig, args: TrainArgs
) -> RidgeResult:
    """The registry's ``fit`` of ``"ridge"``: :func:`~genedml_sd.model.fit_ridge` on the device chosen by ``args.accelerator``.

    The other training arguments do not apply to a closed-form fit.
    """
    return fit_ridge(train, val, config, device=compute_device(args.accelerator))


def compute_device(accelerator: str) -> torch.device:
    """CUDA for ``"auto"`` / ``"gpu"`` / ``"cuda"`` when available, else the CPU (for closed-form fits)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
