"""Registry of frozen tile encoders, their loading (Hugging Face Hub, local files, random init) and fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from genedml_sd._settings import settings

from ._builtin import EMBED_DIM as STAIN_TEXTURE_DIM
from ._builtin import VERSION as STAIN_TEXTURE_VERSION

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
RANDOM_INIT = "random-init-seed0"
_POOLS = ("token", "avg", "cls+mean")
_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors", ".ckpt")


class EncoderWeightsError(RuntimeError):
    """The weights of an encoder cannot be obtained or do not fit its architecture."""


class UnknownEncoderError(KeyError, ValueError):
    """No encoder of that name is registered (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EncoderSpec:
    """Description of a frozen tile encoder.

    Attributes
    ----------
    name
        Registry name.
    description
        One-line description.
    builder
        ``"timm"`` (a :func:`timm.create_model` architecture), ``"builtin"`` (shipped with this
        package) or ``"custom"`` (a callable given to :func:`register_encoder`).
    timm_name
        timm architecture name, e.g. ``"vit_large_patch16_224"``.
    hub_id
        Where the pretrained weights live, ``"hf-hub:<org>/<repo>"``, or ``None``.
    timm_kwargs
        Keyword arguments of :func:`timm.create_model` (architecture only). String values of keys
        ending in ``_layer`` that contain a dot (``"timm.layers.SwiGLUPacked"``) are imported.
    embed_dim
        Feature width D after pooling.
    pool
        ``"token"`` or ``"avg"``: the backbone's own pooled output (class token or average, as set
        by ``timm_kwargs``); ``"cls+mean"``: class token concatenated with the mean of the patch
        tokens (register tokens excluded), from ``forward_features``.
    mean, std
        Input normalisation (RGB in ``[0, 1]``).
    input_px
        Tile side the encoder expects; other sizes are resized (bilinear, antialiased).
    gated
        The weights need a Hugging Face account that accepted the model's licence.
    imagenet_pretrained
        The pretrained weights are timm's ImageNet weights (not a pathology model).
    hub_filenames
        Weights file names tried in the Hub repository, in order.
    version
        Version of the encoder definition; part of the fingerprint.
    """

    name: str
    description: str
    builder: str = "timm"
    timm_name: str | None = None
    hub_id: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0
    pool: str = "token"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_px: int = 224
    gated: bool = False
    imagenet_pretrained: bool = False
    hub_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    version: str = ""

    def __post_init__(self) -> None:
        if self.builder not in ("timm", "builtin", "custom"):
            raise ValueError(f"builder must be 'timm', 'builtin' or 'custom', got {self.builder!r}.")
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}.")
        if self.builder == "timm" and not self.timm_name:
            raise ValueError(f"Encoder {self.name!r}: a timm encoder needs timm_name.")
        if self.hub_id is not None and not self.hub_id.startswith("hf-hub:"):
            raise ValueError(f"hub_id must look like 'hf-hub:<org>/<repo>', got {self.hub_id!r}.")
        if int(self.embed_dim) <= 0:
            raise ValueError(f"Encoder {self.name!r}: embed_dim must be positive, got {self.embed_dim!r}.")

    @property
    def repo_id(self) -> str | None:
        """Hub repository (``hub_id`` without the ``hf-hub:`` prefix)."""
        return None if self.hub_id is None else self.hub_id.removeprefix("hf-hub:")

    def architecture(self) -> dict[str, Any]:
        """JSON-able description of everything that defines the function computed (not the weights).

        Returns
        -------
        Dict of the architecture fields.
        """
        d = asdict(self)
        for k in ("description", "hub_id", "gated", "imagenet_pretrained", "hub_filenames"):
            d.pop(k)
        d["timm_kwargs"] = {k: _jsonable(v) for k, v in sorted(self.timm_kwargs.items())}
        return d


@dataclass
class _Entry:
    spec: EncoderSpec
    builder: Callable[..., Any] | None = None


_REGISTRY: dict[str, _Entry] = {}


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, type) or callable(v):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
    return repr(v)


def register_encoder(
    spec: EncoderSpec,
    *,
    builder: Callable[..., Any] | None = None,
    overwrite: bool = False,
) -> EncoderSpec:
    """Add an encoder to the registry.

    Parameters
    ----------
    spec
        The encoder's description. A timm architecture needs ``timm_name`` (and ``hub_id`` for
        pretrained weights); for a callable ``builder`` use ``builder="custom"`` in the spec (set
        automatically).
    builder
        Optional callable ``builder(spec, pretrained=bool)`` returning an ``nn.Module`` (or a
        ``(module, embed_dim)`` tuple) that maps normalised float tiles (B, 3, input_px, input_px)
        to features (B, embed_dim) (or, with ``pool="cls+mean"``, has a timm-like
        ``forward_features`` returning tokens and a ``num_prefix_tokens`` attribute). With
        ``pretrained=False`` it must not download anything; it is called under a fixed seed.
    overwrite
        Replace an existing entry of the same name.

    Returns
    -------
    The registered spec.
    """
    if builder is not None and spec.builder != "custom":
        spec = EncoderSpec(**{**asdict(spec), "builder": "custom", "timm_kwargs": dict(spec.timm_kwargs)})
    if spec.builder == "custom" and builder is None:
        raise ValueError(f"Encoder {spec.name!r}: builder='custom' needs a builder callable.")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = _Entry(spec, builder)
    return spec


def list_encoders(names_only: bool = False) -> pd.DataFrame | list[str]:
    """The registered encoders.

    Parameters
    ----------
    names_only
        Return only the names.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by name with columns ``description``, ``embed_dim``,
    ``hub_id``, ``gated``, ``builder`` and ``timm_name``; or, with ``names_only``, a list of names.
    """
    if names_only:
        return list(_REGISTRY)
    import pandas as pd

    rows = [
        {
            "name": e.spec.name,
            "description": e.spec.description,
            "embed_dim": e.spec.embed_dim,
            "hub_id": e.spec.hub_id,
            "gated": e.spec.gated,
            "builder": e.spec.builder,
            "timm_name": e.spec.timm_name,
        }
        for e in _REGISTRY.values()
    ]
    return pd.DataFrame(rows).set_index("name")


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder.

    Parameters
    ----------
    name
        Registry name.

    Returns
    -------
    The :class:`EncoderSpec`.

    Raises
    ------
    UnknownEncoderError
        (a ``KeyError`` and ``ValueError``) if no such encoder is registered.
    """
    return _entry(name).spec


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownEncoderError(
            f"Unknown encoder {name!r}. Available encoders: {', '.join(_REGISTRY)} "
            "(see genedml_sd.encoders.list_encoders(); add your own with register_encoder())."
        ) from None


# ---------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Run under a fixed torch seed without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if k.endswith("_layer") and isinstance(v, str) and "." in v:
            module, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(module), attr)
        out[k] = v
    return out


def pooled_width(backbone: nn.Module, pool: str) -> int:
    """Feature width of a timm backbone under a pooling rule.

    Parameters
    ----------
    backbone
        A timm model built with ``num_classes=0``.
    pool
        ``"token"``, ``"avg"`` or ``"cls+mean"``.

    Returns
    -------
    ``num_features`` (twice that for ``"cls+mean"``).
    """
    width = int(backbone.num_features)
    return 2 * width if pool == "cls+mean" else width


def build_backbone(spec: EncoderSpec, *, pretrained: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """Build an encoder's architecture, without weights (random init under seed 0).

    Parameters
    ----------
    spec
        The encoder spec (or use :func:`get_spec`).
    pretrained
        Only for custom builders: ask the callable for its pretrained module. timm architectures
        are always built without weights here (see :func:`load_encoder`).
    device
        Device to build on; ``"meta"`` builds shapes only (no memory, no init), e.g. to check widths.

    Returns
    -------
    The backbone ``nn.Module`` (not frozen).
    """
    device = torch.device(device)
    if spec.builder == "builtin":
        if spec.name != "stain-texture":
            raise ValueError(f"Unknown builtin encoder {spec.name!r}.")
        from ._builtin import StainTexture

        with device:
            return StainTexture()
    with _seeded(0), device:
        if spec.builder == "custom":
            built = _entry(spec.name).builder(spec, pretrained=pretrained)
            module, dim = built if isinstance(built, tuple) else (built, spec.embed_dim)
            if int(dim) != spec.embed_dim:
                raise ValueError(
                    f"Encoder {spec.name!r}: builder returned embed_dim {dim}, spec says {spec.embed_dim}."
                )
            return module
        import timm

        backbone = timm.create_model(spec.timm_name, pretrained=False, **_resolve_kwargs(spec.timm_kwargs))
    width = pooled_width(backbone, spec.pool)
    if width != spec.embed_dim:
        raise ValueError(
            f"Encoder {spec.name!r}: the architecture gives {width}-d features, the spec says {spec.embed_dim}."
        )
    return backbone


# ---------------------------------------------------------------------------------------------
# weights


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


def _hub_file_sha256(path: Path) -> str:
    """Content hash of a Hub-cached file: the blob name (the LFS sha256) if it is one, else hashed."""
    with contextlib.suppress(OSError):
        blob = Path(os.path.realpath(path)).name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
    return file_sha256(path)


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


def _fingerprint(spec: EncoderSpec, weights_id: str, extra: str = "") -> str:
    payload = json.dumps({"arch": spec.architecture(), "weights": weights_id, "extra": extra}, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


# ---------------------------------------------------------------------------------------------
# the frozen encoder


class FrozenEncoder(nn.Module):
    """A frozen tile encoder: uint8 RGB tiles in, float32 features out.

    Use :func:`load_encoder` to make one. Parameters never require gradients and the module stays
    in eval mode (``train()`` is a no-op), so it is safe inside a training loop.

    Parameters
    ----------
    backbone
        The network (timm model, builtin or custom module).
    spec
        Its spec.
    fingerprint
        Identity of the function computed (name, architecture, weights); used as cache key.

    Attributes
    ----------
    name
        Registry name.
    embed_dim
        Feature width D.
    spec
        The :class:`EncoderSpec`.
    fingerprint
        ``"<name>-<sha256 prefix>"`` of the architecture and the weights identity (the content
        sha256 of a weights file, local or from the Hub; ``"random-init-seed0"`` for random init;
        the feature-definition version for builtins).
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, fingerprint: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.name = spec.name
        self.embed_dim = int(spec.embed_dim)
        self.fingerprint = fingerprint
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x / 255 normalised: (x / 255 - mean) / std = x * scale - shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)
        self._channels_last = spec.builder == "timm"
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Keep eval mode whatever ``mode`` (the encoder is frozen).

        Parameters
        ----------
        mode
            Ignored.

        Returns
        -------
        self
        """
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode tiles.

        Parameters
        ----------
        x
            RGB tiles (B, 3, H, W), ``uint8`` or float in ``[0, 255]``; resized to ``input_px`` if needed.

        Returns
        -------
        Features (B, embed_dim), float32.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected tiles of shape (B, 3, H, W), got {tuple(x.shape)}.")
        x = x.to(device=self.scale.device, dtype=torch.float32)
        px = self.spec.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x = x * self.scale - self.shift
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.spec.pool == "cls+mean":
            tokens = self.backbone.forward_features(x)
            n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=1)
        else:
            out = self.backbone(x)
        return out.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, fingerprint={self.fingerprint!r}"


def load_encoder(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | PathLike | None = None,
    hf_token: str | None = None,
    device: str | torch.device = "cpu",
) -> FrozenEncoder:
    """Load a frozen encoder by name.

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`), e.g. ``"uni"`` (the paper's), ``"stain-texture"``
        (offline, no weights).
    pretrained
        Load the pretrained weights (from the Hugging Face Hub, or timm's ImageNet weights). Never
        falls back silently: if the weights cannot be had, :class:`EncoderWeightsError` is raised.
        ``False`` gives a deterministic random initialisation (seed 0, caller's RNG untouched) and
        never touches the network: for tests and benchmarks only.
    weights
        Local weights file (``.bin``, ``.pth``, ``.pt``, ``.safetensors``) to load instead of the
        Hub's; takes precedence over ``pretrained``. Loaded strictly.
    hf_token
        Hugging Face token for gated models (default: ``HF_TOKEN`` or the stored login).
    device
        Device to put the encoder on.

    Returns
    -------
    The :class:`FrozenEncoder` (eval mode, no gradients).

    Raises
    ------
    UnknownEncoderError
        Unknown ``name`` (a ``KeyError`` and ``ValueError``; the message lists the encoders).
    FileNotFoundError
        ``weights`` does not exist.
    EncoderWeightsError
        Pretrained weights cannot be downloaded, or the weights do not fit the architecture.
    """
    entry = _entry(name)
    spec = entry.spec
    extra = ""
    if spec.builder == "custom":
        extra = _jsonable(entry.builder)
    if spec.builder == "builtin":
        if weights is not None:
            raise ValueError(f"Encoder {name!r} has no weights; do not pass weights=.")
        backbone = build_backbone(spec)
        weights_id = spec.version or name
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Encoder weights file not found: {str(path)!r}.")
        state_dict = read_state_dict(path)
        backbone = load_weights(_build_for_weights(spec), state_dict, name=name, source=repr(str(path)))
        weights_id = "sha256:" + file_sha256(path)
    elif not pretrained:
        backbone = build_backbone(spec, pretrained=False)
        weights_id = RANDOM_INIT
        if spec.builder == "timm":
            import timm

            weights_id += f":timm-{timm.__version__}"
    elif spec.builder == "custom":
        backbone = build_backbone(spec, pretrained=True)
        weights_id = "custom-pretrained"
    else:
        path = download_weights(spec, hf_token=hf_token)
        backbone = load_weights(
            _build_for_weights(spec), read_state_dict(path), name=name, source=f"{spec.hub_id} ({path.name})"
        )
        weights_id = "sha256:" + _hub_file_sha256(path)
    encoder = FrozenEncoder(backbone, spec, _fingerprint(spec, weights_id, extra))
    return encoder.to(device)


def _build_for_weights(spec: EncoderSpec) -> nn.Module:
    """Architecture to receive a checkpoint: on ``meta`` (no wasted random init) when every tensor is in the state dict."""
    if spec.builder == "timm":
        backbone = build_backbone(spec, device="meta")
        persistent = set(backbone.state_dict())
        if all(n in persistent for n, _ in backbone.named_buffers()):
            return backbone
    return build_backbone(spec, pretrained=False)


# ---------------------------------------------------------------------------------------------
# default registry

_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"

_DEFAULTS = (
    EncoderSpec(
        name="uni",
        description="UNI (Mahmood Lab): ViT-L/16 pathology foundation model, DINOv2 on 100k WSIs; Gene-DML's encoder",
        timm_name="vit_large_patch16_224",
        hub_id="hf-hub:MahmoodLab/uni",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        embed_dim=1024,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
    ),
    EncoderSpec(
        name="uni2-h",
        description="UNI2-h (Mahmood Lab): ViT-H/14 with 8 register tokens and SwiGLU, 200M+ tiles",
        timm_name="vit_giant_patch14_224",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        gated=True,
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
    ),
    EncoderSpec(
        name="h-optimus-0",
        description="H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, DINOv2 on 500k+ slides",
        timm_name="vit_giant_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "global_pool": "token",
            "dynamic_img_size": False,
        },
        embed_dim=1536,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        gated=True,
    ),
    EncoderSpec(
        name="virchow2",
        description="Virchow2 (Paige): ViT-H/14 with 4 registers and SwiGLU; class token + mean patch token",
        timm_name="vit_huge_patch14_224",
        hub_id="hf-hub:paige-ai/Virchow2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
        },
        embed_dim=2560,
        pool="cls+mean",
        gated=True,
    ),
    EncoderSpec(
        name="resnet50",
        description="ResNet-50 with timm's ImageNet weights (a1_in1k); global average pool",
        timm_name="resnet50",
        hub_id="hf-hub:timm/resnet50.a1_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=2048,
        pool="avg",
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="vit-s16",
        description="ViT-S/16 with timm's ImageNet weights (augreg in21k->in1k); mainly for speed benchmarks",
        timm_name="vit_small_patch16_224",
        hub_id="hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=384,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="vit-l16",
        description="ViT-L/16 with timm's ImageNet weights (augreg in21k->in1k); mainly for speed benchmarks",
        timm_name="vit_large_patch16_224",
        hub_id="hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
        timm_kwargs={"num_classes": 0},
        embed_dim=1024,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        imagenet_pretrained=True,
    ),
    EncoderSpec(
        name="stain-texture",
        description="Offline, weight-free H&E descriptor: stain deconvolution, composition, texture, nuclei",
        builder="builtin",
        embed_dim=STAIN_TEXTURE_DIM,
        pool="token",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        version=STAIN_TEXTURE_VERSION,
    ),
)

for _spec in _DEFAULTS:
    register_encoder(_spec)
del _spec
