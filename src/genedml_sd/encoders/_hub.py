"""Hugging Face Hub: finding or downloading an encoder's weights file, with errors that say how to get access."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._specs import EncoderSpec
from ._weights import EncoderWeightsError, file_sha256


def _hub_file_sha256(path: Path) -> str:
    """Content hash of a Hub-cached file: the blob name (the LFS sha256) if it is one, else hashed."""
    with contextlib.suppress(OSError):
        blob = Path(os.path.realpath(path)).name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
    return file_sha256(path)


def _weights_help(spec: EncoderSpec) -> str:
    repo = spec.repo_id
    steps = []
    if repo is not None and spec.gated:
        steps.append(
            f"accept the model's licence at https://huggingface.co/{repo} and log in with `huggingface-cli login` "
            "(or `hf auth login`), set the HF_TOKEN environment variable or pass hf_token='hf_...'; the download "
            "needs network access with HF_HUB_OFFLINE unset, unless the weights are already in the Hugging Face cache"
        )
    elif repo is not None:
        steps.append(
            "allow network access to the Hugging Face Hub (HF_HUB_OFFLINE unset; a token in HF_TOKEN or "
            "hf_token= only if the repository needs one), or have the weights in the Hugging Face cache"
        )
    steps.append(
        "download the weights file yourself and pass weights='/path/to/pytorch_model.bin' (.bin, .pth, .pt or .safetensors)"
    )
    steps.append(
        "pass pretrained=False for a randomly initialised encoder (tests and benchmarks only: "
        "its features carry no pretrained knowledge)"
    )
    steps.append("or use the encoder 'stain-texture', which works offline without any weights")
    return "To use it: " + "; ".join(f"({i}) {step}" for i, step in enumerate(steps, 1)) + "."


def _offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().lower() in ("1", "true", "yes", "on")


def download_weights(spec: EncoderSpec, *, hf_token: str | None = None) -> Path:
    """Find an encoder's weights file in the Hugging Face cache, or download it.

    The cache is looked up first (no network). Otherwise one metadata request checks that the Hub is
    reachable and which weights file the repository holds, so that an unreachable Hub fails within
    seconds instead of going through the download retries.

    Parameters
    ----------
    spec
        Encoder spec with a ``hub_id``.
    hf_token
        Hugging Face token (default: ``HF_TOKEN`` or the stored login).

    Returns
    -------
    Local path of the weights file.

    Raises
    ------
    EncoderWeightsError
        When the file cannot be had (no access to a gated model, offline, network errors).
    """
    repo = spec.repo_id
    if repo is None:
        raise EncoderWeightsError(f"Encoder {spec.name!r} has no pretrained weights on the Hub. {_weights_help(spec)}")
    token = hf_token or None

    def fail(why: str, err: BaseException | None = None) -> EncoderWeightsError:
        msg = f"Could not get the weights of encoder {spec.name!r} from the Hugging Face Hub ({spec.hub_id}): {why}. "
        exc = EncoderWeightsError(msg + _weights_help(spec))
        exc.__cause__ = err
        return exc

    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with timm
        raise fail("huggingface_hub is not installed", err) from err
    for filename in spec.hub_filenames:
        try:
            return Path(hf_hub_download(repo, filename, token=token, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or unreadable cache): try the network
            continue
    if _offline():
        raise fail("offline mode (HF_HUB_OFFLINE=1) and the weights are not in the local Hugging Face cache")
    try:
        info = HfApi().model_info(repo, token=token)
    except Exception as err:
        kind = type(err).__name__
        if kind == "GatedRepoError":
            why = "no access to this gated model with the current credentials"
        elif kind == "RepositoryNotFoundError":
            why = "repository not found or not accessible (gated models need a token)"
        else:
            why = f"the Hub could not be reached ({kind}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        raise fail(why, err) from err
    present = {s.rfilename for s in (info.siblings or [])}
    candidates = [f for f in spec.hub_filenames if not present or f in present]
    if not candidates:
        raise fail(f"none of {list(spec.hub_filenames)} is in the repository")
    try:
        return Path(hf_hub_download(repo, candidates[0], token=token))
    except Exception as err:
        kind = type(err).__name__
        if kind in ("GatedRepoError", "RepositoryNotFoundError"):
            why = "no access to this gated model with the current credentials"
        else:
            why = f"{kind}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        raise fail(why, err) from err


# ---------------------------------------------------------------------------------------------
# encoders named by a timm model name ("timm:<name>") or a timm model on the Hub ("hf-hub:<repo>")

PREFIXES = ("timm:", "hf-hub:")


def is_prefixed(name: object) -> bool:
    """Whether ``name`` is a ``"timm:<name>"`` or ``"hf-hub:<org>/<repo>"`` encoder name."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def prefixed_spec(name: str, timm_kwargs: Mapping[str, Any] | None = None) -> EncoderSpec:
    """The spec of a ``"timm:<name>"`` or ``"hf-hub:<org>/<repo>"`` encoder.

    The architecture is timm's (headless: ``num_classes=0``), the normalisation and input size
    those of the model's pretrained config, the width the backbone's pooled width, the pooling its
    own (``"token"`` for class-token ViTs, else ``"avg"``). ``"hf-hub:"`` reads the repository's
    ``config.json`` (from the Hugging Face cache, or one download).

    Parameters
    ----------
    name
        ``"timm:vit_small_patch16_224.augreg_in21k"`` (any :func:`timm.list_models` name, with or
        without a pretrained tag) or ``"hf-hub:1aurent/vit_small_patch16_224.lunit_dino"``.
    timm_kwargs
        Extra keyword arguments of :func:`timm.create_model` (e.g. ``mlp_layer`` as a dotted path).

    Returns
    -------
    The :class:`EncoderSpec` (not registered).

    Raises
    ------
    KeyError
        Unknown timm model name.
    EncoderWeightsError
        The ``config.json`` of an ``"hf-hub:"`` repository cannot be had.
    """
    import timm
    import torch

    from ._build import _resolve_kwargs, pooled_width

    kwargs: dict[str, Any] = {"num_classes": 0, **dict(timm_kwargs or {})}
    if name.startswith("timm:"):
        model = name.removeprefix("timm:")
        if not model or not timm.is_model(model):
            raise KeyError(
                f"timm has no model named {model!r} (encoder {name!r}); see timm.list_models('*vit*'), "
                "or use 'hf-hub:<org>/<repo>' for a timm model on the Hugging Face Hub."
            )
        arch = model
        cfg = timm.models.get_pretrained_cfg(model)
        cfg_dict = cfg.to_dict() if cfg is not None else {}
        hub = cfg_dict.get("hf_hub_id") or None
    else:
        repo = name.removeprefix("hf-hub:")
        try:
            from timm.models._hub import load_model_config_from_hf

            parsed = load_model_config_from_hf(repo)
        except Exception as err:  # offline, gated, not found: say how to get it
            raise EncoderWeightsError(
                f"Could not read the timm config.json of {name!r} from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). Allow network "
                "access (HF_HUB_OFFLINE unset), log in for gated repositories (HF_TOKEN or `hf auth login`), or "
                "have the repository in the Hugging Face cache."
            ) from err
        cfg_dict, arch, model_args = dict(parsed[0]), parsed[1], (parsed[2] if len(parsed) > 2 else {})
        kwargs = {**dict(model_args or {}), **kwargs}
        hub = repo
    with torch.device("meta"):
        backbone = timm.create_model(arch, pretrained=False, **_resolve_kwargs(kwargs))
    pool = "token" if getattr(backbone, "global_pool", None) == "token" else "avg"
    size = cfg_dict.get("input_size") or (3, 224, 224)
    filenames = tuple(dict.fromkeys([cfg_dict.get("hf_hub_filename") or "", "model.safetensors", "pytorch_model.bin"]))
    return EncoderSpec(
        name=name,
        description=f"timm {arch}" + (f" (weights: {hub})" if hub else ""),
        timm_name=arch,
        hub_id=f"hf-hub:{hub}" if hub else None,
        timm_kwargs=kwargs,
        embed_dim=pooled_width(backbone, pool),
        pool=pool,
        mean=tuple(float(v) for v in cfg_dict.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg_dict.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        input_px=int(size[-1]),
        hub_filenames=tuple(f for f in filenames if f),
        source=f"timm pretrained config of {arch}" + (f"; https://huggingface.co/{hub}" if hub else ""),
    )
