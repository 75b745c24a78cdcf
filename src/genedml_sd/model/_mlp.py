"""MLP baseline (``method="mlp"``): an ST-Net-like head on the local-tile features, trained with MSE.

No spatial context and no contrastive loss: :class:`MLPConfig`, :class:`~genedml_sd.model.MLPRegressor`. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from genedml_sd._docs import docs

from ._base import (
    LossOutput,
    SlideModule,
    SpotBatch,
    TrainedConfig,
    check_local_only,
    expression_mean_float64,
    feature_stats_float64,
)
from ._data import SlideTensors
from ._losses import prediction_loss


@docs
@dataclass(frozen=True)
class MLPConfig(TrainedConfig):
    """Hyper-parameters of :class:`~genedml_sd.model.MLPRegressor` (ST-Net-like head) and its training.

    Attributes
    ----------
    %(config_dims)s
    hidden
        Hidden width of the head.
    dropout
        Dropout after the hidden layer.
    lr, weight_decay
        Adam learning rate and weight decay.
    step_size, gamma, lr_interval
        StepLR schedule: the rate is multiplied by ``gamma`` every ``step_size`` units of ``lr_interval``
        (``"epoch"``, as the paper states, or ``"step"``: optimiser steps).
    use_local, use_neighbour, use_global
        Scale switches, fixed to local only.
    """

    hidden: int = 512
    dropout: float = 0.1
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_local_only(self)
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


class MLPRegressor(SlideModule):
    """ST-Net-like head: standardise -> ``Linear(D, hidden)`` -> GELU -> Dropout -> ``Linear(hidden, G)``.

    The output bias starts at the mean training expression (:meth:`prepare`). Trained with MSE
    (Adam + StepLR) by the shared training plan.
    """

    config: MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(config.enc_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.n_genes),
        )

    @property
    def output_bias(self) -> torch.Tensor:
        """Bias (G,) of the output layer."""
        return cast(nn.Linear, self.net[-1]).bias

    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Feature statistics and output bias (mean expression) from the training slides, computed in float64."""
        mean, std = feature_stats_float64(train)
        self.set_feature_stats(mean, std)
        self.set_output_bias(expression_mean_float64(train))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D)."""
        return self.net(self.standardise(local))

    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted expression (B, G) from local features (B, D)."""
        return self(local)

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        """MSE of a batch (part ``pred``)."""
        loss = prediction_loss(self(batch.local), batch.expr)
        return LossOutput(loss, {"pred": loss})
