"""The encoder catalogue: registering, listing and loading encoders by name (defaults in :mod:`._zoo`), wrapping modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._build import _build_for_weights, build_backbone, truncated_modules
from ._frozen import RANDOM_INIT, FrozenEncoder, _fingerprint
from ._hub import _hub_file_sha256, download_weights, is_prefixed, prefixed_spec
from ._specs import EncoderSpec, _jsonable
from ._weights import convert_state_dict, file_sha256, load_weights, module_sha256, read_state_dict
from ._zoo import ZOO

if TYPE_CHECKING:
    import pandas as pd

    from ._transforms import StainNormalizer


class UnknownEncoderError(KeyError, ValueError):
    """No encoder of that name is registered (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    spec: EncoderSpec
    builder: Callable[..., Any] | None = None
    module: nn.Module | None = None  # set by wrap_encoder: the module itself, fingerprinted by its parameters


_REGISTRY: dict[str, _Entry] = {}
_PREFIXED: dict[tuple[str, str], _Entry] = {}  # resolved "timm:" / "hf-hub:" names, by (name, kwargs)


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
    if is_prefixed(spec.name):
        raise ValueError(f"Encoder names starting with 'timm:' or 'hf-hub:' are resolved by timm; got {spec.name!r}.")
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

    ``"timm:<name>"`` and ``"hf-hub:<org>/<repo>"`` names are accepted everywhere without being
    listed (see :func:`load_encoder`).

    Parameters
    ----------
    names_only
        Return only the names.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by name with columns ``description``, ``embed_dim`` (D),
    ``input_px``, ``pool``, ``mean``, ``std`` (RGB in [0, 1]), ``hub_id``, ``gated``, ``licence``,
    ``commercial`` (``True``/``False``, ``None`` if not stated), ``builder``, ``timm_name`` and
    ``source`` (where the facts were checked); or, with ``names_only``, a list of names.
    """
    if names_only:
        return list(_REGISTRY)
    import pandas as pd

    rows = [
        {
            "name": e.spec.name,
            "description": e.spec.description,
            "embed_dim": e.spec.embed_dim,
            "input_px": e.spec.input_px,
            "pool": e.spec.pool,
            "mean": tuple(e.spec.mean),
            "std": tuple(e.spec.std),
            "hub_id": e.spec.hub_id,
            "gated": e.spec.gated,
            "licence": e.spec.licence,
            "commercial": e.spec.commercial,
            "builder": e.spec.builder,
            "timm_name": e.spec.timm_name,
            "source": e.spec.source,
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


def _entry(name: str, timm_kwargs: Mapping[str, Any] | None = None) -> _Entry:
    if is_prefixed(name) and name not in _REGISTRY:
        key = (name, repr(sorted(dict(timm_kwargs or {}).items())))
        if key not in _PREFIXED:
            try:
                _PREFIXED[key] = _Entry(prefixed_spec(name, timm_kwargs))
            except KeyError as err:
                raise UnknownEncoderError(str(err.args[0])) from None
        return _PREFIXED[key]
    if timm_kwargs:
        raise ValueError("timm_kwargs= is only for 'timm:' and 'hf-hub:' encoder names.")
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownEncoderError(
            f"Unknown encoder {name!r}. Available encoders: {', '.join(_REGISTRY)} "
            "(see genedml_sd.encoders.list_encoders()), any timm model as 'timm:<name>' or 'hf-hub:<org>/<repo>'; "
            "add your own with register_encoder() or wrap_encoder()."
        ) from None


def load_encoder(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | PathLike | None = None,
    hf_token: str | None = None,
    device: str | torch.device = "cpu",
    timm_kwargs: Mapping[str, Any] | None = None,
    tta: str | None = None,
    stain_norm: StainNormalizer | None = None,
) -> FrozenEncoder:
    """Load a frozen encoder by name.

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`), e.g. ``"uni"`` (the paper's), ``"stain-texture"``
        (offline, no weights); or any timm model: ``"timm:<name>"`` (a :func:`timm.list_models`
        name, pretrained weights from timm's Hub repository) or ``"hf-hub:<org>/<repo>"`` (a timm
        model on the Hugging Face Hub), with the normalisation, input size and pooling of the
        model's pretrained config.
    pretrained
        Load the pretrained weights (from the Hugging Face Hub, or timm's ImageNet weights). Never
        falls back silently: if the weights cannot be had, :class:`EncoderWeightsError` is raised.
        ``False`` gives a deterministic random initialisation (seed 0, caller's RNG untouched) and
        never touches the network (except for the ``config.json`` of ``"hf-hub:"`` names): for
        tests and benchmarks only.
    weights
        Local weights file (``.bin``, ``.pth``, ``.pt``, ``.safetensors``) to load instead of the
        Hub's; takes precedence over ``pretrained``. Loaded strictly (after the spec's
        :attr:`~EncoderSpec.key_map` conversion).
    hf_token
        Hugging Face token for gated models (default: ``HF_TOKEN`` or the stored login).
    device
        Device to put the encoder on.
    timm_kwargs
        Only for ``"timm:"`` / ``"hf-hub:"`` names: extra :func:`timm.create_model` arguments.
    tta
        ``"d4"``: test-time augmentation, every feature the mean over the tile's 8 rotations / flips
        (see :meth:`FrozenEncoder.with_transforms`); part of the fingerprint, so of the feature cache key.
    stain_norm
        A :class:`~genedml_sd.encoders.StainNormalizer` (from :func:`~genedml_sd.encoders.fit_stain_normalizer` on a reference tile) applied to every
        tile first; part of the fingerprint.

    Returns
    -------
    The :class:`FrozenEncoder` (eval mode, no gradients).

    Raises
    ------
    UnknownEncoderError
        Unknown ``name`` or timm model (a ``KeyError`` and ``ValueError``; the message lists the encoders).
    FileNotFoundError
        ``weights`` does not exist.
    EncoderWeightsError
        Pretrained weights cannot be downloaded, or the weights do not fit the architecture.
    """
    entry = _entry(name, timm_kwargs)
    spec = entry.spec
    extra = ""
    if spec.builder == "custom":
        extra = _jsonable(entry.builder)
    if entry.module is not None:
        if weights is not None:
            raise ValueError(f"Encoder {name!r} wraps a module with its own weights; do not pass weights=.")
        backbone = entry.module
        weights_id = "params-sha256:" + module_sha256(backbone)
    elif spec.builder == "builtin":
        if weights is not None:
            raise ValueError(f"Encoder {name!r} has no weights; do not pass weights=.")
        backbone = build_backbone(spec)
        weights_id = spec.version or name
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Encoder weights file not found: {str(path)!r}.")
        backbone = _load_checkpoint(entry, read_state_dict(path), source=repr(str(path)))
        weights_id = "sha256:" + file_sha256(path)
    elif not pretrained:
        backbone = build_backbone(spec, pretrained=False, builder=entry.builder)
        weights_id = RANDOM_INIT
        if spec.builder == "timm":
            import timm

            weights_id += f":timm-{timm.__version__}"
    elif spec.builder == "custom" and spec.hub_id is None:
        backbone = build_backbone(spec, pretrained=True, builder=entry.builder)
        weights_id = "custom-pretrained"
    else:
        path = download_weights(spec, hf_token=hf_token)
        backbone = _load_checkpoint(entry, read_state_dict(path), source=f"{spec.hub_id} ({path.name})")
        weights_id = "sha256:" + _hub_file_sha256(path)
    encoder = FrozenEncoder(backbone, spec, _fingerprint(spec, weights_id, extra), tta=tta, stain_norm=stain_norm)
    return encoder.to(device)


def _load_checkpoint(entry: _Entry, state_dict: Mapping[str, torch.Tensor], *, source: str) -> nn.Module:
    """Build the architecture, map the checkpoint onto it (``key_map``, truncation) and load it strictly."""
    spec = entry.spec
    backbone = _build_for_weights(spec, entry.builder)
    drop = tuple(f"{m}." for m in truncated_modules(backbone, spec.truncate_after)) if spec.truncate_after else ()
    if spec.key_map or drop:
        state_dict = convert_state_dict(state_dict, spec.key_map, backbone, drop_prefixes=drop)
    return load_weights(backbone, state_dict, name=spec.name, source=source)


class _Wrapped(nn.Module):
    """A callable (B, 3, H, W) -> (B, D) as a module; a bound method's module becomes a submodule."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        owner = getattr(fn, "__self__", None)
        self.owner = owner if isinstance(owner, nn.Module) else None
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def wrap_encoder(
    module: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    *,
    name: str,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    input_px: int = 224,
    embed_dim: int | None = None,
    pool: str = "token",
    description: str = "",
    overwrite: bool = False,
) -> FrozenEncoder:
    """Register any module or callable as a frozen encoder, as sopa accepts callables.

    Parameters
    ----------
    module
        An ``nn.Module`` or callable mapping normalised float tiles (B, 3, input_px, input_px) to
        features (B, D). With ``pool="cls+mean"`` a module with a timm-like ``forward_features``
        (tokens (B, n, C)) and ``num_prefix_tokens``. The module is frozen in place (eval mode, no
        gradients) and used as it is: no copy, no weights loaded.
    name
        Registry name (not a default encoder's; ``"timm:"``/``"hf-hub:"`` prefixes are reserved).
        Wrapping again under the same name replaces the earlier wrap.
    mean, std
        Input normalisation (RGB in ``[0, 1]``) the module expects.
    input_px
        Tile side the module expects; other tiles are resized (bilinear, antialiased).
    embed_dim
        Feature width D; ``None``: found by one forward pass of a blank tile.
    pool
        ``"token"`` (the module's output is the feature) or ``"cls+mean"``.
    description
        One-line description for :func:`list_encoders`.
    overwrite
        Allow replacing an encoder registered by other means.

    Returns
    -------
    The :class:`FrozenEncoder`, on the module's device. Its :attr:`~FrozenEncoder.fingerprint`
    hashes the module's parameters and buffers (so feature caches differ when the weights differ)
    and the spec; ``load_encoder(name)`` gives it again (in this session). A callable that is not
    a module, nor a bound method of one, has no parameters to hash: give a distinct ``name`` to
    each distinct function.

    Raises
    ------
    ValueError
        ``name`` taken by another encoder (without ``overwrite``), or D cannot be found.
    """
    if not callable(module):
        raise TypeError(f"module must be an nn.Module or a callable, got {type(module).__name__}.")
    net = module if isinstance(module, nn.Module) else _Wrapped(module)
    old = _REGISTRY.get(name)
    if old is not None and old.module is None and not overwrite:
        raise ValueError(f"An encoder named {name!r} is already registered; pass overwrite=True to replace it.")
    if old is not None and old.module is None and any(s.name == name for s, _ in ZOO):
        raise ValueError(f"{name!r} is a default encoder; wrap the module under another name.")
    device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
    if embed_dim is None:
        probe = FrozenEncoder(
            net, EncoderSpec(name=name, description="", builder="custom", embed_dim=1, pool=pool, input_px=input_px), ""
        ).to(device)
        with torch.no_grad():
            out = probe(torch.full((1, 3, input_px, input_px), 128, dtype=torch.uint8, device=device))
        if out.ndim != 2 or out.shape[0] != 1:
            raise ValueError(f"Encoder {name!r}: the module gave {tuple(out.shape)}, expected (B, D) features.")
        embed_dim = int(out.shape[1])
    spec = EncoderSpec(
        name=name,
        description=description or f"wrapped {type(module).__name__}",
        builder="custom",
        embed_dim=int(embed_dim),
        pool=pool,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        input_px=int(input_px),
        source="wrap_encoder",
    )
    _REGISTRY[name] = _Entry(spec, _module_builder, module=net)
    return load_encoder(name, device=device)


def _module_builder(spec: EncoderSpec, *, pretrained: bool = False) -> nn.Module:  # pragma: no cover - never called
    raise RuntimeError(f"Encoder {spec.name!r} wraps a module; load it with load_encoder().")


for _spec, _builder in ZOO:
    register_encoder(_spec, builder=_builder)
del _spec, _builder
