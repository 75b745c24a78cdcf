"""Training options and results, shared by every method (no Lightning import here)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Trainer arguments set from :class:`TrainArgs` or by the training plan itself; not allowed in ``trainer_kwargs``.
RESERVED_TRAINER_KWARGS: dict[str, str] = {
    "max_epochs": "TrainArgs.max_epochs",
    "accelerator": "TrainArgs.accelerator",
    "devices": "TrainArgs.devices",
    "strategy": "TrainArgs.strategy",
    "precision": "TrainArgs.precision",
    "enable_progress_bar": "TrainArgs.progress",
    "enable_checkpointing": "TrainArgs.checkpoint_dir",
    "logger": "the training plan (it keeps its own history)",
    "enable_model_summary": "the training plan",
    "num_sanity_val_steps": "the training plan",
    "limit_val_batches": "the training plan (validation runs when validation slides are given)",
    "log_every_n_steps": "the training plan",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclass(frozen=True)
class TrainArgs:
    """How to train a method: the arguments every gradient-trained method shares, documented once.

    Attributes
    ----------
    max_epochs
        Maximum number of epochs (passes over all training spots), >= 1.
    batch_size
        Spots per batch, >= 2 (contrastive losses need pairs).
    mix_slides
        ``False`` (default): every batch holds spots of one slide, so in-batch contrastive negatives
        come from that slide only. ``True``: every batch draws its spots from all training slides, so
        negatives also come from other slides and patients; Gene-DML's global branch still attends
        within each spot's own slide (one context per slide in the batch, so a step costs up to one
        global pass per slide it touches).
    seed
        Seed of the weights, dropout, in-batch k-means and batch order (``lightning.seed_everything``).
    accelerator, devices, strategy
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``devices=2, strategy="ddp"`` for two GPUs).
    precision
        Trainer precision; ``None`` picks bf16 mixed precision on GPUs that support it, fp16 mixed on
        other GPUs and fp32 on the CPU (:func:`resolve_precision`).
    patience
        Early-stopping patience in epochs on the validation mean per-gene PCC (``val/pcc``); only used
        with validation slides, which also select the best epoch, whose weights are restored.
    checkpoint_dir
        Folder for checkpoints. Every epoch writes ``last.ckpt`` (full training state) and ``run.json``
        (what was trained, to check a resume against); with validation, ``best-epoch=<k>.ckpt`` (weights
        of the best epoch) too. ``None``: a temporary folder for the best weights only.
    progress
        Show an epoch progress bar with the training loss and the validation PCC (and Lightning's
        messages); ``False`` trains silently.
    resume
        Continue the run in ``checkpoint_dir`` from its ``last.ckpt`` (the same data, method, config,
        seed and batch size: a mismatch is a ValueError naming it). Without ``last.ckpt`` training starts
        from scratch (logged). The continued run gives the same history and weights as an
        uninterrupted one (single process).
    trainer_kwargs
        Further :class:`~lightning.pytorch.Trainer` arguments (e.g. ``{"num_nodes": 2}``); a
        ``"callbacks"`` list is added to the plan's own callbacks. Arguments that :class:`TrainArgs` or the
        plan set are refused.
    """

    max_epochs: int = 100
    batch_size: int = 256
    mix_slides: bool = False
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: Any = "auto"
    precision: str | int | None = None
    patience: int = 10
    checkpoint_dir: str | os.PathLike | None = None
    progress: bool = False
    resume: bool = False
    trainer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, low in (("max_epochs", 1), ("batch_size", 2), ("patience", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                extra = " (contrastive losses need pairs)" if name == "batch_size" else ""
                raise ValueError(f"TrainArgs.{name} must be an integer >= {low}{extra}, got {value!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"TrainArgs.seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.accelerator, str) or not self.accelerator:
            raise ValueError(f"TrainArgs.accelerator must be a non-empty string, got {self.accelerator!r}.")
        if not (isinstance(self.devices, str | list | tuple) or (_is_int(self.devices) and self.devices >= -1)):
            raise ValueError(
                f"TrainArgs.devices must be 'auto', an integer or a list of device ids, got {self.devices!r}."
            )
        if self.precision is not None and not isinstance(self.precision, str | int):
            raise ValueError(
                f"TrainArgs.precision must be None or a Lightning precision string, got {self.precision!r}."
            )
        for name in ("mix_slides", "progress", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainArgs.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, str | os.PathLike) or not str(self.checkpoint_dir):
                raise ValueError(
                    f"TrainArgs.checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}."
                )
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir).expanduser())
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("TrainArgs(resume=True) needs checkpoint_dir: the folder of the run to continue.")
        if self.trainer_kwargs is not None:
            if not isinstance(self.trainer_kwargs, dict):
                raise ValueError(
                    f"TrainArgs.trainer_kwargs must be a dict or None, got {type(self.trainer_kwargs).__name__}."
                )
            clash = sorted(set(self.trainer_kwargs) & set(RESERVED_TRAINER_KWARGS))
            if clash:
                where = "; ".join(f"{k}: use {RESERVED_TRAINER_KWARGS[k]}" for k in clash)
                raise ValueError(f"trainer_kwargs may not set {clash} ({where}).")
            object.__setattr__(self, "trainer_kwargs", dict(self.trainer_kwargs))


@dataclass
class TrainResult:
    """What training a method returns.

    Attributes
    ----------
    module
        The trained :class:`~genedml_sd.model.SlideModule`, in eval mode (best epoch's weights when
        validating); on the device it was trained on.
    config
        The config the module was built with (with training-time fields filled in, e.g. BLEEP's
        ``n_reference`` or ridge's ``n_components`` / ``alpha``): save this one.
    history
        One dict per epoch: ``epoch``, ``train/<part>`` epoch means (``train/total`` and the method's
        loss parts), ``val/pcc`` and ``val/mse`` with validation slides, ``lr``.
    best_epoch
        Epoch whose weights were kept (``None`` without validation: the last epoch).
    contexts
        Per-training-slide static contexts of the module (:meth:`~genedml_sd.model.SlideModule.slide_context`,
        e.g. NH2ST's spot neighbourhoods); empty if it has none.
    selection
        What :meth:`~genedml_sd.model.SlideModule.select_on_validation` chose on the validation slides
        after training (e.g. Gene-DML's ``predictor="auto"``: the predictor and each candidate's score);
        empty if nothing.
    seconds
        Wall-clock seconds spent training, set by :func:`~genedml_sd.model.train_method` (one-off
        imports of the training back end excluded, so the first fold of a run is not charged for them).
    """

    module: Any
    config: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    contexts: list[Any] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def resolve_precision(precision: str | int | None, accelerator: str) -> str:
    """``None`` -> bf16 mixed precision on GPUs that support it, fp16 mixed on other GPUs, fp32 on CPU."""
    if precision is not None:
        return str(precision)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


@contextlib.contextmanager
def quiet_lightning(quiet: bool = True) -> Iterator[None]:
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
