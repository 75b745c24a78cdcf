"""Resumable, interruptible training: run signatures, random-number states, Ctrl-C handling (no Lightning import).

A checkpoint folder holds ``last.ckpt`` (the full training state after the last complete epoch),
``run.json`` (the signature of the run: method, config, seed, batch size, slides and a cheap checksum
of their tensors) and, with validation, ``best-epoch=<k>.ckpt``. Resuming checks the signature first,
so a checkpoint is never continued on other data or with another configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import SlideTensors, TokenGrid

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"
SIGNATURE_FORMAT = 1


# ====================================================================================== signature
def tensor_checksum(x: torch.Tensor | None, rows: int = 256) -> str | None:
    """Cheap fingerprint of a (N, ...) tensor: its shape, dtype and the bytes of about ``rows`` evenly spaced rows."""
    if x is None:
        return None
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    if x.numel():
        step = max(1, x.shape[0] // rows)
        h.update(x[::step].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def slide_signature(slide: SlideTensors, *, neighbour: bool) -> dict[str, Any]:
    """Name, shapes and checksums of a slide's tensors (neighbour features only if the method reads them)."""
    parts: dict[str, torch.Tensor | None] = {"local": slide.local, "coords": slide.coords, "expr": slide.expr}
    nb = slide.neighbour
    if neighbour and isinstance(nb, TokenGrid):  # dense mode: tokens once per lattice tile
        parts["neighbour_tokens"], parts["neighbour_index"] = nb.tokens, nb.index
    elif neighbour and not isinstance(nb, TokenGrid):
        parts["neighbour"] = nb
    return {
        "name": slide.name,
        "shapes": {k: None if v is None else list(v.shape) for k, v in parts.items()},
        "checksums": {k: tensor_checksum(v) for k, v in parts.items()},
    }


def run_signature(
    method: str,
    config: Any,
    *,
    seed: int,
    batch_size: int,
    mix_slides: bool = False,
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors],
) -> dict[str, Any]:
    """What identifies a training run for resuming (JSON-ready; ``max_epochs`` and ``patience`` may change)."""
    neighbour = bool(config.use_neighbour)
    sig = {
        "format": SIGNATURE_FORMAT,
        "method": method,
        "config": config.to_dict(),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "mix_slides": bool(mix_slides),
        "train": [slide_signature(s, neighbour=neighbour) for s in train],
        "val": [slide_signature(s, neighbour=neighbour) for s in val],
    }
    return json.loads(json.dumps(sig))  # tuples -> lists, as read back from run.json


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a saved and the current run signature (empty if they match)."""
    out = []
    for key in ("method", "seed", "batch_size", "mix_slides"):
        if saved.get(key, False if key == "mix_slides" else None) != current.get(key):
            out.append(f"{key} {saved.get(key)!r} (checkpoint) != {current.get(key)!r} (now)")
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    for name in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(name) != new_cfg.get(name):
            out.append(f"config.{name} {old_cfg.get(name)!r} (checkpoint) != {new_cfg.get(name)!r} (now)")
    for role in ("train", "val"):
        old, new = saved.get(role, []), current.get(role, [])
        label = "training" if role == "train" else "validation"
        if [s["name"] for s in old] != [s["name"] for s in new]:
            out.append(f"{label} slides {[s['name'] for s in old]} (checkpoint) != {[s['name'] for s in new]} (now)")
            continue
        for a, b in zip(old, new, strict=True):
            for what in ("shapes", "checksums"):
                bad = sorted(k for k in set(a[what]) | set(b[what]) if a[what].get(k) != b[what].get(k))
                if bad:
                    out.append(f"{label} slide {a['name']!r}: {what[:-1]} of {bad} differ")
                    break
    return out


def prepare_checkpoint_dir(folder: Path, signature: dict[str, Any], *, resume: bool) -> Path | None:
    """Check (when resuming) and write ``run.json`` in a checkpoint folder.

    Returns
    -------
    The ``last.ckpt`` to continue from, or ``None`` to start from scratch.

    Raises
    ------
    ValueError
        When resuming a folder whose ``run.json`` differs from this run (naming the differences), or
        that has ``last.ckpt`` but no ``run.json``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    last, run_file = folder / LAST_CHECKPOINT, folder / RUN_FILE
    start_from = None
    if resume:
        if not last.exists():
            logger.warning("resume=True but %s does not exist: training starts from scratch.", last)
        elif not run_file.exists():
            raise ValueError(f"Cannot resume from {last}: {run_file} is missing, so the run cannot be checked.")
        else:
            saved = json.loads(run_file.read_text())
            diffs = signature_differences(saved, signature)
            if diffs:
                raise ValueError(
                    f"Cannot resume from {last}: it belongs to a different run ({'; '.join(diffs)}). Use another "
                    "checkpoint_dir, or resume=False to start over in this one."
                )
            logger.info("Resuming training from %s", last)
            start_from = last
    elif last.exists():
        logger.warning("%s holds a previous run's checkpoint; it will be overwritten (resume=True continues it).", last)
    atomic_write_text(run_file, json.dumps(signature, indent=1))
    return start_from


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file and a rename, so it is never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ====================================================================================== random state
def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python random states, as checkpoint-safe tensors and lists."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the random states saved by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npk = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": npk["key"].numpy().astype(np.uint32), "pos": npk["pos"]},
            "has_gauss": npk["has_gauss"],
            "gauss": npk["gauss"],
        }
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ====================================================================================== Ctrl-C
class TrainingInterrupted(BaseException):
    """Raised in the training loop after SIGINT while :func:`sigint_interrupts_training` is active.

    Not a ``KeyboardInterrupt``: Lightning turns that into ``sys.exit(1)`` and ignores SIGINT from then
    on. The caller of the training function receives a ``KeyboardInterrupt`` again.
    """


class InterruptRequest:
    """Set by the SIGINT handler of :func:`sigint_interrupts_training`; checked at safe points of training."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """Raise :class:`TrainingInterrupted` if an interrupt was requested."""
        if self.requested:
            raise TrainingInterrupted


@contextlib.contextmanager
def sigint_interrupts_training(request: InterruptRequest | None = None) -> Iterator[InterruptRequest]:
    """Within the block, a first SIGINT (Ctrl-C) requests a stop at the next safe point; a second one stops at once.

    The training loop calls ``request.check()`` before every batch and epoch, so checkpoints are never
    half-written; the previous SIGINT handler is restored afterwards. Outside the main thread, or where
    SIGINT is ignored (e.g. a background job), the handler is left alone.
    """
    request = InterruptRequest() if request is None else request
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.requested:
            raise TrainingInterrupted
        request.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
