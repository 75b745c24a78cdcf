"""Lightning training of NH2ST on cached slide features (imports lightning; ``_nh2st`` does not)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from ._data import SlideTensors, SpotBatches
from ._lightning import _History, mean_gene_pcc, resolve_precision
from ._nh2st import NH2ST, NH2STConfig, spot_neighbourhood

logger = logging.getLogger(__name__)


class LitNH2ST(pl.LightningModule):
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
        super().__init__()
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
        self.config = config
        self.model = NH2ST(config)
        self.train_slides = list(train)
        self.val_slides = list(val or [])
        self.batch_size = batch_size
        self.seed = seed
        self.neighbourhoods = [spot_neighbourhood(s.coords, config.pitch_um, config.radius) for s in self.train_slides]
        self.batches = SpotBatches([s.n_spots for s in self.train_slides], batch_size, seed)
        self.history: list[dict[str, Any]] = []
        feats = torch.cat([s.local for s in self.train_slides])
        self.model.set_feature_stats(feats.mean(0), feats.std(0))
        self.model.set_output_bias(torch.cat([s.expr for s in self.train_slides]).mean(0))

    # ----------------------------------------------------------------------------- data
    def train_dataloader(self) -> DataLoader:
        """Within-slide spot batches (indices only; features are gathered in the step)."""
        return DataLoader(self.batches, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        """One item per validation slide."""
        return DataLoader(list(range(len(self.val_slides))), batch_size=None, shuffle=False)

    def on_train_epoch_start(self) -> None:
        """Reshuffle the batches for this epoch."""
        self.batches.set_epoch(self.current_epoch)

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
        n = local.shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return losses["total"]

    def validation_step(self, batch: int | torch.Tensor, batch_idx: int) -> None:
        """Predict a whole validation slide; log mean per-gene PCC and MSE."""
        slide = self.val_slides[int(batch)]
        pred = self.model.predict_slide(slide.local, slide.coords, batch_size=max(self.batch_size, 1024))
        target = slide.expr.to(pred.device)
        self.log("val/pcc", mean_gene_pcc(pred, target), batch_size=1, sync_dist=True)
        self.log("val/mse", torch.nn.functional.mse_loss(pred, target), batch_size=1, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam + StepLR (per epoch)."""
        cfg = self.config
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


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
    callbacks: list[pl.Callback] = [_History()]
    tmp = None
    ckpt = None
    if val:
        if checkpoint_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="nh2st-ckpt-")
            checkpoint_dir = tmp.name
        ckpt = pl.callbacks.ModelCheckpoint(
            dirpath=str(checkpoint_dir),
            monitor="val/pcc",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            filename="best-{epoch}",
        )
        callbacks += [ckpt, pl.callbacks.EarlyStopping(monitor="val/pcc", mode="max", patience=patience)]
    elif checkpoint_dir is not None:
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True, save_weights_only=True)
        callbacks.append(ckpt)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=resolve_precision(precision, accelerator),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=1.0 if val else 0,
        **(trainer_kwargs or {}),
    )
    try:
        trainer.fit(lit)
        if val and ckpt is not None and ckpt.best_model_path:
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            lit.load_state_dict(state)
            best = ckpt.best_model_score
            logger.info(
                "Restored best epoch (val/pcc=%.4f) from %s",
                float(best) if best is not None else np.nan,
                ckpt.best_model_path,
            )
            lit.best_epoch = int(Path(ckpt.best_model_path).stem.split("=")[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return lit
