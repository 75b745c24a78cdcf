"""The one LightningModule that trains every gradient-trained method (imports lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ._base import SlideModule, check_slides, targets
from ._batch import SlidePart, SpotBatch
from ._data import SlideTensors, SpotBatches
from ._losses import mean_gene_pcc
from ._resume import capture_rng_state, restore_rng_state

#: Key of the plan's own state in a full checkpoint (history, random states, stop flag).
STATE_KEY = "genedml_sd"


class TrainingPlan(pl.LightningModule):
    """Trains a :class:`~genedml_sd.model.SlideModule` on a list of slides.

    * Data: spot batches within one slide, or mixed across slides with ``mix_slides``
      (:class:`~genedml_sd.model.SpotBatches`, reshuffled every epoch from ``seed`` and the epoch); each step gathers the batch's local features, expression and (if
      the config reads them) neighbour features on the device as a :class:`~genedml_sd.model.SpotBatch`
      and calls ``module.training_loss``; every returned loss value is logged as ``train/<name>``
      (epoch mean).
    * Validation: each validation slide is predicted whole with ``module.predict_slide``; logs
      ``val/pcc`` (mean per-gene Pearson r) and ``val/mse``. ``module.on_validation_start`` runs first.
    * Optimisation: ``module.configure_optimizer()`` (Adam + StepLR from the config by default); the
      scheduler is stepped once per epoch, or once per optimiser step when the config's ``lr_interval`` is
      ``"step"``.
    * Set-up: ``module.prepare(train)`` (feature statistics, output bias, ...) and one
      ``module.slide_context(slide)`` per training slide (``self.contexts``).
    * Checkpoints: a full checkpoint also stores the history and the torch / numpy / python random
      states, so a resumed run continues exactly.

    Parameters
    ----------
    module
        The module to train.
    train, val
        Training and (optional) validation slides, with expression.
    batch_size
        Spots per batch.
    seed
        Seed of the batch order.
    mix_slides
        Draw every batch from all training slides (in-batch negatives from other slides) instead of
        from one slide.
    """

    def __init__(
        self,
        module: SlideModule,
        train: Sequence[SlideTensors],
        val: Sequence[SlideTensors] | None = None,
        *,
        batch_size: int = 256,
        seed: int = 0,
        mix_slides: bool = False,
    ) -> None:
        super().__init__()
        check_slides(train, val, module.config)
        self.module = module
        self.config = module.config
        self.train_slides = list(train)
        self.val_slides = list(val or [])
        self.batch_size = batch_size
        self.seed = seed
        self.batches = SpotBatches([s.n_spots for s in self.train_slides], batch_size, seed, mix_slides=mix_slides)
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        module.prepare(self.train_slides)
        self.contexts = [module.slide_context(s) for s in self.train_slides]
        self._restore: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------- data
    def train_dataloader(self) -> DataLoader:
        """Spot batches (indices only; features are gathered in the step)."""
        return DataLoader(self.batches, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        """One item per validation slide."""
        items = cast("Dataset[int]", list(range(len(self.val_slides))))  # a list is a map-style dataset
        return DataLoader(items, batch_size=None, shuffle=False)

    def on_train_epoch_start(self) -> None:
        """Reshuffle the batches for this epoch."""
        self.batches.set_epoch(self.current_epoch)

    # ----------------------------------------------------------------------------- steps
    def gather(self, batch: dict[str, torch.Tensor]) -> SpotBatch:
        """The :class:`~genedml_sd.model.SpotBatch` of a ``SpotBatches`` item, on this module's device."""
        ids = batch["slide"].cpu()
        idx = batch["index"].cpu()
        if ids.ndim == 0:
            runs = [(int(ids), 0, idx.numel())]
        else:  # a mixed batch is ordered by slide: one contiguous run per slide
            bounds = torch.nonzero(ids[1:] != ids[:-1]).flatten().add(1).tolist()
            starts, stops = [0, *bounds], [*bounds, idx.numel()]
            runs = [(int(ids[a]), a, b) for a, b in zip(starts, stops, strict=True)]
        dev = self.device
        parts, local, expr, neighbour = [], [], [], []
        for i, a, b in runs:
            slide = self.train_slides[i]
            rows = idx[a:b]
            parts.append(SlidePart(slide, i, rows, slice(a, b), self.contexts[i]))
            local.append(slide.local[rows])
            expr.append(targets(slide)[rows])
            if self.config.use_neighbour:
                assert slide.neighbour is not None  # checked by check_slides
                neighbour.append(slide.neighbour[rows])

        def on_device(xs: list[torch.Tensor]) -> torch.Tensor:
            return (xs[0] if len(xs) == 1 else torch.cat(xs)).to(dev, non_blocking=True)

        return SpotBatch(tuple(parts), on_device(local), on_device(expr), on_device(neighbour) if neighbour else None)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One batch: the module's loss, logged per part."""
        spots = self.gather(batch)
        loss = self.module.training_loss(spots)
        for name, value in loss.logged().items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=spots.size, sync_dist=True)
        return loss.total

    def on_validation_epoch_start(self) -> None:
        """Let the module prepare for prediction (e.g. rebuild a retrieval bank)."""
        self.module.on_validation_start()

    def validation_step(self, batch: int | torch.Tensor, batch_idx: int) -> None:
        """Predict a whole validation slide; log mean per-gene PCC and MSE."""
        slide = self.val_slides[int(batch)]
        pred = self.module.predict_slide(
            slide.local, slide.coords, slide.neighbour, batch_size=max(self.batch_size, 1024)
        )
        target = targets(slide).to(pred.device)
        self.log("val/pcc", mean_gene_pcc(pred, target), batch_size=1, sync_dist=True)
        self.log("val/mse", F.mse_loss(pred, target), batch_size=1, sync_dist=True)

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        """The module's optimiser and scheduler, stepped by Lightning per epoch or per step (``config.lr_interval``)."""
        opt, sched = self.module.configure_optimizer()
        if sched is None:
            return opt
        interval = getattr(self.config, "lr_interval", "epoch")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def on_train_start(self) -> None:
        """When resuming a run that had stopped early: stay stopped."""
        state, self._restore = self._restore, None
        if state and state.get("should_stop"):
            self.trainer.should_stop = True

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Full checkpoints (not weights-only ones) also carry the history, random states and stop flag."""
        if "optimizer_states" not in checkpoint:
            return
        checkpoint[STATE_KEY] = {
            "history": [dict(row) for row in self.history],
            "rng": capture_rng_state(),
            "should_stop": bool(self.trainer.should_stop),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the history and the random states (resuming).

        The random states are set here, before Lightning creates the first resumed epoch's data iterator
        (which draws a seed from torch's generator), as in an uninterrupted run.
        """
        state = checkpoint.get(STATE_KEY)
        if state is not None:
            self.history = [dict(row) for row in state.get("history", [])]
            if state.get("rng") is not None:
                restore_rng_state(state["rng"])
            self._restore = state
