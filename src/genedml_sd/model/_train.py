"""``train_module``: the Lightning loop shared by every gradient-trained method (imports lightning)."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch

from ._base import SlideModule
from ._data import SlideTensors
from ._options import TrainArgs, TrainResult, quiet_lightning, resolve_precision
from ._plan import STATE_KEY, TrainingPlan
from ._resume import (
    LAST_CHECKPOINT,
    InterruptRequest,
    TrainingInterrupted,
    prepare_checkpoint_dir,
    run_signature,
    sigint_interrupts_training,
)

logger = logging.getLogger(__name__)


class History(pl.Callback):
    """Collects epoch-level metrics into ``pl_module.history`` (and a JSON file, for spawned DDP workers).

    With ``strategy="ddp_spawn"`` training runs in child processes whose module attributes never
    reach the caller; rank 0 therefore also writes the history to ``path``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = cast(TrainingPlan, pl_module)  # this callback is only attached to a TrainingPlan
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            row[k] = float(v)
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        plan.history.append(row)
        if self.path is not None and trainer.is_global_zero:
            self.path.write_text(json.dumps(plan.history))


class LastCheckpoint(pl.callbacks.Checkpoint):
    """Writes the full training state to ``path`` after every epoch (atomically: temporary file + rename).

    Runs after the other checkpoint / early-stopping callbacks, so their state for the epoch is included.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, self.path)
        finally:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)


class InterruptCheck(pl.Callback):
    """Stops training at the next batch or epoch boundary after Ctrl-C (see :func:`sigint_interrupts_training`)."""

    def __init__(self, request: InterruptRequest) -> None:
        self.request = request

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.request.check()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.request.check()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.request.check()


class EpochProgress(pl.Callback):
    """An epoch progress bar (tqdm) showing the training loss and, when validating, ``val/pcc``."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.max_epochs, initial=trainer.current_epoch, desc="Training", unit="epoch")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is None:
            return
        metrics = trainer.callback_metrics
        shown = {"loss": metrics.get("train/total"), "val_pcc": metrics.get("val/pcc")}
        self.bar.set_postfix({k: f"{float(v):.4f}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_module(
    module: SlideModule,
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    args: TrainArgs,
    *,
    method: str | None = None,
) -> TrainResult:
    """Train a module with the shared :class:`~genedml_sd.model.TrainingPlan` (Lightning).

    With validation slides, training stops early when the validation mean per-gene PCC has not
    improved for ``args.patience`` epochs, and the best epoch's weights are restored. Validation slides
    must come from the training data (never the test fold). With ``args.checkpoint_dir`` every epoch
    writes ``last.ckpt`` and ``run.json`` there, and ``args.resume`` continues such a run (see
    :class:`~genedml_sd.model.TrainArgs`). Ctrl-C (SIGINT) stops training within a batch, keeps the
    checkpoints of the last complete epoch and raises ``KeyboardInterrupt``.

    The global random generators are not seeded here: for reproducible weights, seed before building
    the module (:func:`~genedml_sd.model.train_method` does, with ``args.seed``).

    Parameters
    ----------
    module
        The module to train (built from its config; ``module.prepare`` is called here).
    train, val
        Slides with features and expression; ``val`` may be ``None`` or empty.
    args
        Training arguments.
    method
        The method's registry name, recorded in ``run.json`` (default: the module's class name).

    Returns
    -------
    :class:`~genedml_sd.model.TrainResult`; the module is in eval mode, on the training device.

    Raises
    ------
    KeyboardInterrupt
        When training was interrupted by SIGINT.
    """
    plan = TrainingPlan(module, train, val, batch_size=args.batch_size, seed=args.seed, mix_slides=args.mix_slides)
    has_val = bool(plan.val_slides)
    folder = None if args.checkpoint_dir is None else Path(args.checkpoint_dir).resolve()
    resume_from = None
    if folder is not None:
        signature = run_signature(
            method or type(module).__qualname__,
            module.config,
            seed=args.seed,
            batch_size=args.batch_size,
            mix_slides=args.mix_slides,
            train=plan.train_slides,
            val=plan.val_slides,
        )
        resume_from = prepare_checkpoint_dir(folder, signature, resume=args.resume)
    extra = dict(args.trainer_kwargs or {})
    user_callbacks = list(extra.pop("callbacks", None) or [])

    tmp = tempfile.TemporaryDirectory(prefix="genedml-train-")
    history_file = Path(tmp.name) / "history.json"
    interrupt = InterruptRequest()
    callbacks: list[pl.Callback] = [History(history_file), InterruptCheck(interrupt)]
    if args.progress:
        callbacks.append(EpochProgress())
    best = None
    if has_val:
        best = pl.callbacks.ModelCheckpoint(
            dirpath=str(folder or tmp.name),
            monitor="val/pcc",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            filename="best-{epoch}",
        )
        callbacks += [best, pl.callbacks.EarlyStopping(monitor="val/pcc", mode="max", patience=args.patience)]
    callbacks += user_callbacks
    if folder is not None:
        callbacks.append(LastCheckpoint(folder / LAST_CHECKPOINT))  # last: sees the epoch's other callback states
    try:
        # Lightning's device summary and tips only at debug verbosity; our epoch bar is separate
        with quiet_lightning(not logger.isEnabledFor(logging.DEBUG)):
            trainer = pl.Trainer(
                max_epochs=args.max_epochs,
                accelerator=args.accelerator,
                devices=args.devices,
                strategy=args.strategy,
                # a Lightning precision name (typed as a Literal by Lightning), checked by the Trainer
                precision=cast(Any, resolve_precision(args.precision, args.accelerator)),
                callbacks=callbacks,
                logger=False,
                enable_checkpointing=any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks),
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                log_every_n_steps=1,
                **({} if has_val else cast(dict[str, Any], {"limit_val_batches": 0})),
                **extra,
            )
            with sigint_interrupts_training(interrupt), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # run.json is there
                trainer.fit(plan, ckpt_path=resume_from, weights_only=True)
        if not plan.history and history_file.exists():  # trained in spawned processes
            plan.history = json.loads(history_file.read_text())
        if not plan.history and resume_from is not None:  # nothing left to train: the checkpoint's history
            plan.history = _checkpoint_history(resume_from)
        if best is not None and best.best_model_path:
            state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            plan.load_state_dict(state)
            score = best.best_model_score
            logger.info(
                "Restored best epoch (val/pcc=%.4f) from %s",
                float(score) if score is not None else np.nan,
                best.best_model_path,
            )
            plan.best_epoch = _epoch_of(best.best_model_path)
    except TrainingInterrupted:
        last = None if folder is None else folder / LAST_CHECKPOINT
        where = f"; the last complete epoch is in {last}" if last is not None and last.exists() else ""
        logger.warning("Training interrupted (SIGINT)%s.", where)
        raise KeyboardInterrupt(f"Training interrupted{where}.") from None
    finally:
        tmp.cleanup()
    module.on_fit_end()
    module.eval()
    selection = module.select_on_validation(plan.val_slides)
    if selection:
        logger.info("Chosen on the validation slides: %s", selection)
    return TrainResult(
        module=module,
        config=module.config,
        history=plan.history,
        best_epoch=plan.best_epoch,
        contexts=plan.contexts,
        selection=selection,
    )


def _epoch_of(path: str | Path) -> int:
    """The epoch in a ``best-epoch=<k>[-v<n>].ckpt`` file name."""
    match = re.search(r"epoch=(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"Cannot read the epoch from the checkpoint name {path}.")
    return int(match.group(1))


def _checkpoint_history(path: Path) -> list[dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=True).get(STATE_KEY) or {}
    return [dict(row) for row in state.get("history", [])]
