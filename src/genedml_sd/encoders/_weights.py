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


# ---------------------------------------------------------------------------------------------
# checkpoint layouts of other libraries -> timm
#
# Hugging Face ``transformers`` ViTModel / Dinov2Model (and Dinov2 with registers) hold the same
# computation as timm's VisionTransformer (pre-norm blocks, one class token, learned absolute
# position embeddings; layer scale and SwiGLU for DINOv2); only the names differ and query, key and
# value are three Linear layers where timm has one ``qkv``. The per-block mapping:
#
#   layernorm_before | norm1                      -> norm1
#   attention.attention.{query,key,value}         -> attn.qkv (concatenated, in that order)
#   attention.output.dense                        -> attn.proj
#   layer_scale1.lambda1 / layer_scale2.lambda1   -> ls1.gamma / ls2.gamma
#   layernorm_after | norm2                       -> norm2
#   intermediate.dense / output.dense (ViT)       -> mlp.fc1 / mlp.fc2
#   mlp.fc1 / mlp.fc2, mlp.weights_in / weights_out (SwiGLU, DINOv2) -> mlp.fc1 / mlp.fc2
#
# (transformers >= 5 names these ``layers.N`` / ``attention.{q,k,v,o}_proj`` / ``mlp.{gate,up,down}_proj``
# in its own state dicts, while the Hub files keep the names above; both are read) and outside the blocks: embeddings.cls_token -> cls_token, embeddings.register_tokens ->
# reg_token, embeddings.position_embeddings -> pos_embed, embeddings.patch_embeddings.projection ->
# patch_embed.proj, layernorm -> norm; mask_token and the pooler are dropped. Position embeddings
# stored for another grid are resampled once to the architecture's grid exactly as transformers
# resamples them at run time (bicubic, align_corners=False; antialiased for Dinov2WithRegisters,
# recognised by its register tokens, not for ViT and Dinov2), so the timm model at
# ``input_px`` computes what the transformers model computes at that size.

_HF_BLOCK = {
    "layernorm_before": "norm1",
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "layernorm_after": "norm2",
    "norm2": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DROP = ("embeddings.mask_token", "pooler.")


_HF5_RENAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
)


def _hf_hub_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the state-dict names of transformers >= 5 onto the names of the Hub checkpoints (no-op for those)."""
    out: dict[str, torch.Tensor] = {}
    gate_up: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("layers."):
            key = "encoder.layer." + key.removeprefix("layers.")
        for old, new in _HF5_RENAMES:
            key = key.replace(old, new)
        for part in ("gate_proj", "up_proj"):
            if f".mlp.{part}." in key:
                stem, _, kind = key.rpartition(f".mlp.{part}.")
                gate_up.setdefault(f"{stem}.mlp.weights_in.{kind}", {})[part] = value
                break
        else:
            out[key] = value
    for key, parts in gate_up.items():  # weights_in = [gate; up], as transformers splits it
        if set(parts) != {"gate_proj", "up_proj"}:
            raise EncoderWeightsError(f"Incomplete SwiGLU weights for {key}.")
        out[key] = torch.cat([parts["gate_proj"], parts["up_proj"]], 0)
    return out


def _hf_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = _hf_hub_names(sd)
    for prefix in ("vit.", "dinov2.", "model."):  # task-model wrappers around the bare backbone
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(_HF_DROP):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        parts = key.split(".")
        if key.startswith("encoder.layer.") and len(parts) > 4:
            i, rest = parts[2], ".".join(parts[3:])
            if rest.startswith("attention.attention."):
                which, kind = parts[5], parts[6]  # query|key|value, weight|bias
                qkv.setdefault((i, kind), {})[which] = value
                continue
            stem, _, kind = rest.rpartition(".")
            if stem in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[stem]}.{kind}"] = value
                continue
            if rest in _HF_BLOCK:  # layer_scale*.lambda1 (no .weight/.bias)
                out[f"blocks.{i}.{_HF_BLOCK[rest]}"] = value
                continue
        out[key] = value  # left for the strict check to report
    for (i, kind), parts_ in qkv.items():
        if set(parts_) != {"query", "key", "value"}:
            raise EncoderWeightsError(f"Block {i}: incomplete attention {kind} (found {sorted(parts_)}).")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts_["query"], parts_["key"], parts_["value"]], 0)
    return out


def _resample_pos_embed(
    pos: torch.Tensor, target: torch.Size | tuple[int, ...], n_prefix: int, antialias: bool = False
) -> torch.Tensor:
    """Position embeddings (1, n_prefix + g*g, C) resampled to ``target`` as transformers does."""
    import torch.nn.functional as F

    if tuple(pos.shape) == tuple(target) or pos.ndim != 3 or pos.shape[-1] != target[-1]:
        return pos
    n_old, n_new = pos.shape[1] - n_prefix, target[1] - n_prefix
    g_old, g_new = round(n_old**0.5), round(n_new**0.5)
    if g_old * g_old != n_old or g_new * g_new != n_new:
        return pos
    grid = pos[:, n_prefix:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(pos.dtype)
    return torch.cat([pos[:, :n_prefix], grid], 1)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], key_map: str, backbone: nn.Module, *, drop_prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto a timm architecture's parameter names (see :attr:`EncoderSpec.key_map`).

    Parameters
    ----------
    state_dict
        The checkpoint.
    key_map
        ``""`` (unchanged), ``"hf-vit"``, ``"hf-dinov2"`` (Hugging Face ``transformers`` layouts) or
        ``"timm-swin-legacy"`` (Swin checkpoints of timm < 0.6, through timm's own
        ``swin_transformer.checkpoint_filter_fn``).
    backbone
        The architecture (may be on the ``meta`` device): gives the target position-embedding shape.
    drop_prefixes
        Key prefixes to drop (modules removed from the architecture, e.g. ``("layer4.",)``).

    Returns
    -------
    The converted state dict (still checked strictly by :func:`load_weights`).
    """
    sd = dict(state_dict)
    if drop_prefixes:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefixes)}
    if key_map in ("hf-vit", "hf-dinov2"):
        # transformers' Dinov2WithRegisters resamples with antialiasing, ViT and Dinov2 without
        antialias = any(k.endswith("embeddings.register_tokens") for k in sd)
        sd = _hf_to_timm(sd)
        own = getattr(backbone, "pos_embed", None)
        if "pos_embed" in sd and isinstance(own, torch.Tensor):
            pos = sd["pos_embed"]  # transformers: (1, 1 + n, C), the class token's position first
            if _embeds_class(backbone):
                sd["pos_embed"] = _resample_pos_embed(pos, tuple(own.shape), 1, antialias)
            else:
                # timm models with registers add no position to the class token: fold it into the
                # (constant) class token, which is exact
                if "cls_token" in sd:
                    sd["cls_token"] = sd["cls_token"] + pos[:, :1]
                sd["pos_embed"] = _resample_pos_embed(pos[:, 1:], tuple(own.shape), 0, antialias)
    elif key_map == "timm-swin-legacy":
        from timm.models.swin_transformer import checkpoint_filter_fn

        sd = {k: v for k, v in sd.items() if "attn_mask" not in k and "relative_position_index" not in k}
        sd = dict(checkpoint_filter_fn(sd, backbone))
    elif key_map:
        raise ValueError(f"Unknown key_map {key_map!r}.")
    return sd


def _embeds_class(backbone: nn.Module) -> bool:
    return getattr(backbone, "cls_token", None) is not None and not getattr(backbone, "no_embed_class", False)


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and values).

    Parameters
    ----------
    module
        The module (not on the ``meta`` device).

    Returns
    -------
    Hex digest; equal for modules with equal tensors, whatever their device.
    """
    h = hashlib.sha256()
    named = sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items())
    for name, t in named:
        if t.is_meta:
            raise ValueError(f"Cannot fingerprint a module with tensors on the meta device ({name}).")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
