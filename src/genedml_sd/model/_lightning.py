"""Lightning training of Gene-DML on cached slide features (imports lightning; the rest of the layer does not)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from ._config import GeneDMLConfig
from ._data import SlideTensors, SpotBatches
from ._modules import GeneDML

logger = logging.getLogger(__name__)


def mean_gene_pcc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson r across spots, skipping genes constant on either side.

    Parameters
    ----------
    pred, target
        (N, G) predicted and measured expression.
    """
    p = pred.float() - pred.float().mean(0)
    t = target.float() - target.float().mean(0)
    denom = (p.square().sum(0) * t.square().sum(0)).sqrt()
    ok = denom > 0
    if not ok.any():
        return torch.tensor(float("nan"), device=pred.device)
    return ((p * t).sum(0)[ok] / denom[ok]).mean()


class SlideLightningModule(pl.LightningModule):
    """Base LightningModule of the slide-level methods: data, validation and optimiser.

    Holds the training and validation slides, draws within-slide spot batches (:class:`SpotBatches`,
    reshuffled every epoch), validates by predicting each whole validation slide with
    ``model.predict_slide`` (logging ``val/pcc``, the mean per-gene Pearson r, and ``val/mse``), and
    optimises with Adam + StepLR (``config.lr``, ``weight_decay``, ``step_size``, ``gamma``). The frozen
    features are standardised with training statistics and the output bias starts at the mean
    training expression. Subclasses implement ``training_step``.

    Parameters
    ----------
    config
        The method's configuration (``enc_dim``, ``n_genes``, ``use_neighbour``, optimiser fields).
    model
        The ``nn.Module`` to train (with ``predict_slide``, ``set_feature_stats``, ``set_output_bias``).
    train, val
        Training and (optional) validation slides, with expression.
    batch_size
        Spots per batch (batches stay within a slide).
    seed
        Seed of the batch order.
    """

    def __init__(
        self,
        config: Any,
        model: torch.nn.Module,
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
            if config.use_neighbour and s.neighbour is None:
                raise ValueError(f"Slide {s.name!r} has no neighbour features but use_neighbour=True.")
        self.config = config
        self.model = model
        self.train_slides = list(train)
        self.val_slides = list(val or [])
        self.batch_size = batch_size
        self.seed = seed
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

    # ----------------------------------------------------------------------------- steps
    def log_losses(self, losses: dict[str, torch.Tensor], n: int) -> None:
        """Log each loss part as an epoch mean ``train/<name>``."""
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: int | torch.Tensor, batch_idx: int) -> None:
        """Predict a whole validation slide; log mean per-gene PCC and MSE."""
        slide = self.val_slides[int(batch)]
        pred = self.model.predict_slide(
            slide.local, slide.coords, slide.neighbour, batch_size=max(self.batch_size, 1024)
        )
        target = slide.expr.to(pred.device)
        self.log("val/pcc", mean_gene_pcc(pred, target), batch_size=1, sync_dist=True)
        self.log("val/mse", torch.nn.functional.mse_loss(pred, target), batch_size=1, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam + StepLR (per epoch), as in the paper."""
        cfg = self.config
        opt = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class LitGeneDML(SlideLightningModule):
    """LightningModule training a :class:`GeneDML` on a list of slides.

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
        config: GeneDMLConfig,
        train: Sequence[SlideTensors],
        val: Sequence[SlideTensors] | None = None,
        *,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(config, GeneDML(config), train, val, batch_size=batch_size, seed=seed)

    def _gather(self, slide: SlideTensors, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dev = self.device
        idx_cpu = idx.cpu()
        local = slide.local[idx_cpu].to(dev, non_blocking=True)
        nb = slide.neighbour[idx_cpu].to(dev, non_blocking=True) if self.config.use_neighbour else None
        expr = slide.expr[idx_cpu].to(dev, non_blocking=True)
        glob = None
        if self.config.use_global:
            glob = self.model.encode_global(slide.local.to(dev), slide.coords.to(dev))[idx.to(dev)]
        return local, nb, glob, expr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One batch of one slide: forward, losses, logs."""
        slide = self.train_slides[int(batch["slide"])]
        local, nb, glob, expr = self._gather(slide, batch["index"])
        out = self.model(local, nb, glob)
        losses = self.model.loss(out, expr)
        n = local.shape[0]
        self.log_losses(losses, n)
        if self.config.instance_loss:
            self.log("train/tau", self.model.tau, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return losses["total"]


class _History(pl.Callback):
    """Collects epoch-level metrics into ``pl_module.history`` (and a JSON file, for spawned DDP workers).

    With ``strategy="ddp_spawn"`` training runs in child processes whose module attributes never
    reach the caller; rank 0 therefore also writes the history to ``path``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: LitGeneDML) -> None:
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            row[k] = float(v)
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        pl_module.history.append(row)
        if self.path is not None and trainer.is_global_zero:
            self.path.write_text(json.dumps(pl_module.history))


@contextlib.contextmanager
def quiet_lightning(quiet: bool = True):
    """Silence Lightning's informational messages (device summary, tips) and known-noise warnings."""
    if not quiet:
        yield
        return
    names = ["lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """``None`` -> bf16 mixed precision on GPUs that support it, fp16 mixed on other GPUs, fp32 on CPU."""
    if precision is not None:
        return str(precision)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def train_gene_dml(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: GeneDMLConfig,
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
) -> LitGeneDML:
    """Train Gene-DML with Lightning.

    With validation slides, training stops early when the validation mean per-gene PCC has not
    improved for ``patience`` epochs, and the best epoch's weights are restored. Validation slides
    must come from the training data (never the test fold).

    Parameters
    ----------
    train, val
        Slides with features and expression.
    config
        Model configuration (``enc_dim``, ``n_genes`` must match the slides).
    max_epochs, batch_size, seed
        Training length, spots per batch, seed (weights, batches, k-means seeding).
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer` (see :func:`resolve_precision`).
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
    The trained LightningModule; ``.model`` is the :class:`GeneDML`, ``.history`` the per-epoch
    metrics (``train/total``, ``train/instance``, ``train/group``, ``train/pred``, ``val/pcc``, ...).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    lit = LitGeneDML(config, train, val, batch_size=batch_size, seed=seed)
    return fit_lightning(
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


def fit_lightning(
    lit: pl.LightningModule,
    *,
    has_val: bool,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    patience: int = 10,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> pl.LightningModule:
    """The training loop shared by every method: Trainer, early stopping on ``val/pcc``, best-epoch restore.

    ``lit`` must log ``val/pcc`` when ``has_val`` and keep a ``history`` list (filled by
    :class:`_History`). Returns ``lit`` with the best epoch's weights and ``best_epoch`` set.
    """
    tmp = tempfile.TemporaryDirectory(prefix="genedml-train-")
    callbacks: list[pl.Callback] = [_History(Path(tmp.name) / "history.json")]
    ckpt = None
    if has_val:
        if checkpoint_dir is None:
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
    try:
        with quiet_lightning(not progress):
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
                **({} if has_val else {"limit_val_batches": 0}),
                **(trainer_kwargs or {}),
            )
            trainer.fit(lit)
        if has_val and ckpt is not None and ckpt.best_model_path:
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            lit.load_state_dict(state)
            best = ckpt.best_model_score
            logger.info(
                "Restored best epoch (val/pcc=%.4f) from %s",
                float(best) if best is not None else np.nan,
                ckpt.best_model_path,
            )
            lit.best_epoch = int(Path(ckpt.best_model_path).stem.split("=")[-1])
        history_file = Path(tmp.name) / "history.json"
        if not lit.history and history_file.exists():  # trained in spawned processes
            lit.history = json.loads(history_file.read_text())
    finally:
        tmp.cleanup()
    return lit
