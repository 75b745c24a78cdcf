"""Encoder specifications: :class:`EncoderSpec` (what defines a frozen encoder) and the normalisation constants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0/1 model cards, sopa, HEST, TRIDENT
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)  # Hibou model cards via LazySlide / TRIDENT
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)  # Lunit's training statistics, via kaiko's eva
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
_POOLS = ("token", "avg", "cls+mean")
KEY_MAPS = ("", "hf-vit", "hf-dinov2", "timm-swin-legacy")
_METADATA = ("source", "licence", "commercial", "notes")  # descriptive only, not in the fingerprint
_LATER_FIELDS = ("key_map", "truncate_after")


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
    key_map
        How a checkpoint's keys are mapped onto the architecture before strict loading: ``""`` (as
        they are), ``"hf-vit"`` (Hugging Face ``transformers`` ``ViTModel``), ``"hf-dinov2"``
        (``Dinov2Model``, with or without register tokens) or ``"timm-swin-legacy"`` (Swin
        checkpoints of timm < 0.6); see ``genedml_sd.encoders._weights.convert_state_dict``.
    truncate_after
        For timm CNNs: the stage after which the network is cut (``"layer3"``: ResNet-50 up to its
        third stage, 1024 channels), the later stages removed and their checkpoint keys dropped.
    source
        Where the facts of the entry (architecture, input, normalisation, pooling, width, licence)
        were checked: model card URL and reference implementations (``repo:path``).
    licence
        Licence of the weights as stated by their publisher.
    commercial
        Whether that licence allows commercial use (``None``: not stated / not verified).
    notes
        Caveats, in particular facts that could not be verified.
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
    key_map: str = ""
    truncate_after: str = ""
    source: str = ""
    licence: str = ""
    commercial: bool | None = None
    notes: str = ""

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
        if self.key_map not in KEY_MAPS:
            raise ValueError(f"key_map must be one of {KEY_MAPS}, got {self.key_map!r}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Encoder {self.name!r}: mean and std need 3 values, std > 0.")
        if int(self.input_px) <= 0:
            raise ValueError(f"Encoder {self.name!r}: input_px must be positive, got {self.input_px!r}.")

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
        for k in ("description", "hub_id", "gated", "imagenet_pretrained", "hub_filenames", *_METADATA):
            d.pop(k)
        for k in _LATER_FIELDS:  # absent at their default, so that earlier fingerprints stay valid
            if d[k] == "":
                d.pop(k)
        d["timm_kwargs"] = {k: _jsonable(v) for k, v in sorted(self.timm_kwargs.items())}
        return d


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
