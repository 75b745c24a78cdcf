"""Local weight files: reading state dicts, strict loading into an architecture, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genedml_sd._settings import settings


class EncoderWeightsError(RuntimeError):
    """The weights of an encoder cannot be obtained or do not fit its architecture."""


def _hash_cache_file() -> Path:
    return Path(settings.cache_dir) / "weights_sha256.json"


_HASH_MEMO: dict[str, str] = {}


def file_sha256(path: str | PathLike) -> str:
    """SHA-256 of a file's content, cached by resolved path, size and modification time.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    Hex digest.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    cache_file = _hash_cache_file()
    disk: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        disk = json.loads(cache_file.read_text())
    digest = disk.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        disk[key] = digest
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk, indent=0))
            tmp.replace(cache_file)
    _HASH_MEMO[key] = digest
    return digest


def read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle, unwrapping common containers.

    Unwraps ``{"state_dict": ...}``, ``{"model": ...}`` and ``{"module": ...}`` and strips
    ``"module."`` prefixes (DataParallel/DDP). Torch pickles are read with ``weights_only=True``.

    Parameters
    ----------
    path
        The weights file.

    Returns
    -------
    Mapping of parameter names to tensors (on CPU).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Encoder weights file not found: {str(p)!r}.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EncoderWeightsError(
                f"Could not read weights file {str(p)!r} as a torch state dict ({err}). Save the bare "
                "state dict with torch.save(model.state_dict(), path), or use .safetensors."
            ) from err
    for _ in range(3):
        if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            for key in ("state_dict", "model", "module"):
                if isinstance(sd.get(key), Mapping):
                    sd = sd[key]
                    break
            else:
                break
    if not isinstance(sd, Mapping):
        raise EncoderWeightsError(f"Weights file {str(p)!r} does not hold a state dict (got {type(sd).__name__}).")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _fmt_keys(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], *, name: str, source: str) -> nn.Module:
    """Strictly load ``state_dict`` into ``backbone``; a clear error lists missing/unexpected/mis-shaped keys.

    Classifier-head keys (``pretrained_cfg["classifier"]``, e.g. ``head.*``/``fc.*``) absent from a
    headless backbone are dropped. A backbone on the ``meta`` device is materialised from the
    checkpoint tensors.

    Parameters
    ----------
    backbone
        The architecture.
    state_dict
        The weights.
    name
        Encoder name (for messages).
    source
        Where the weights come from (for messages).

    Returns
    -------
    The backbone with the weights (float32 parameters).
    """
    own = backbone.state_dict()
    sd = dict(state_dict)
    head = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for k in list(sd):
        if k not in own and any(k == h or k.startswith(h + ".") for h in heads):
            del sd[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(
                "shape mismatches: " + _fmt_keys([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shapes])
            )
        raise EncoderWeightsError(
            f"The weights in {source} do not fit the architecture of encoder {name!r} "
            f"({'; '.join(parts)}). Check that the file holds this encoder's weights."
        )
    sd = {k: v.to(dtype=own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    is_meta = any(t.is_meta for t in own.values())
    backbone.load_state_dict(sd, strict=True, assign=is_meta)
    if is_meta:
        leftover = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
        if leftover:
            raise EncoderWeightsError(f"Encoder {name!r}: tensors not set by the weights: {_fmt_keys(leftover)}.")
    return backbone
