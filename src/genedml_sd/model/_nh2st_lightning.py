"""Lightning training of NH2ST on cached slide features (imports lightning; ``_nh2st`` does not)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ._data import SlideTensors
from ._lightning import SlideLightningModule, fit_lightning
from ._nh2st import NH2ST, NH2STConfig, spot_neighbourhood

logger = logging.getLogger(__name__)


class LitNH2ST(SlideLightningModule):
    """LightningModule training an :class:`~genedml_sd.model._nh2st.NH2ST` on a list of slides.

    The spot neighbourhood of every training slide (:func:`spot_neighbourhood`, radius and pitch
    from the config) is computed once here. A training step gathers, for its batch of spots of one
    slide, their local features and expression and those of their neighbourhood slots (missing
    slots masked).

    Parameters
    ----------
    config
        Model configuration.
    train, val
        Training and (optional) validation slides, with expression.
    batch_size
        Spots per batch (batches stay within a slide).
    seed
        Seed of the batch order.
    """

    def __init__(
        self,
        config: NH2STConfig,
        train: Sequence[SlideTensors],
        val: Sequence[SlideTensors] | None = None,
        *,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(config, NH2ST(config), train, val, batch_size=batch_size, seed=seed)
        self.neighbourhoods = [spot_neighbourhood(s.coords, config.pitch_um, config.radius) for s in self.train_slides]

    def gather(self, slide_index: int, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors of a batch on the module's device.

        Returns
        -------
        ``local (B, D), expr (B, G), node_local (B, T, D), node_expr (B, T, G), node_mask bool (B, T)``;
        missing slots hold spot 0's values and are masked.
        """
        slide = self.train_slides[slide_index]
        idx = idx.cpu()
        nodes = self.neighbourhoods[slide_index][idx]
        mask = nodes >= 0
        safe = nodes.clamp_min(0)
        dev = self.device
        return (
            slide.local[idx].to(dev, non_blocking=True),
            slide.expr[idx].to(dev, non_blocking=True),
            slide.local[safe].to(dev, non_blocking=True),
            slide.expr[safe].to(dev, non_blocking=True),
            mask.to(dev, non_blocking=True),
        )

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One batch of one slide: gather, losses, logs."""
        local, expr, node_local, node_expr, mask = self.gather(int(batch["slide"]), batch["index"])
        losses = self.model.loss(local, expr, node_local, node_expr, mask)
        self.log_losses(losses, local.shape[0])
        return losses["total"]


def fit_nh2st(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: NH2STConfig,
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
) -> LitNH2ST:
    """Train NH2ST; the implementation of :func:`genedml_sd.model._nh2st.train_nh2st` (same arguments).

    Returns
    -------
    The trained :class:`LitNH2ST` (``.model``, ``.history`` and, with validation, ``.best_epoch``).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    lit = LitNH2ST(config, train, val, batch_size=batch_size, seed=seed)
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
    return lit
