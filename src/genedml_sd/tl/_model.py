"""The user-facing model object: trained weights + everything needed to predict on new slides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd.tiling import TileGeometry

if TYPE_CHECKING:
    from genedml_sd.encoders import FrozenEncoder
    from genedml_sd.encoders._extract import SpotFeatures

MODEL_FILE = "model.pt"
META_FILE = "genedml.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncoderRef:
    """How to rebuild the frozen encoder a model was trained on.

    Attributes
    ----------
    name
        Registry name (see :func:`genedml_sd.encoders.list_encoders`).
    pretrained
        ``False`` for a random-init encoder (tests, benchmarks).
    weights
        Path of a local weights file, if one was used.
    fingerprint
        The encoder's fingerprint (name + weights identity); predictions require features with the
        same fingerprint.
    embed_dim
        Feature width D.
    """

    name: str
    pretrained: bool
    weights: str | None
    fingerprint: str
    embed_dim: int

    @classmethod
    def of(cls, encoder: FrozenEncoder, *, pretrained: bool, weights: str | None) -> EncoderRef:
        """Reference of a loaded encoder."""
        return cls(encoder.name, bool(pretrained), weights, encoder.fingerprint, int(encoder.embed_dim))

    def load(self, **kwargs: Any) -> FrozenEncoder:
        """Load the encoder again (``kwargs`` such as ``hf_token`` go to :func:`~genedml_sd.encoders.load_encoder`)."""
        from genedml_sd.encoders import load_encoder

        return load_encoder(self.name, pretrained=self.pretrained, weights=self.weights, **kwargs)


@dataclass
class GeneDML:
    """A trained Gene-DML model with its gene list, normalisation, encoder and tile geometry.

    Returned by :func:`genedml_sd.tl.fit`; pass it to :func:`genedml_sd.tl.predict`. Save it with
    :meth:`save` and restore it with :meth:`load`.

    Attributes
    ----------
    module
        The trained :class:`genedml_sd.model.GeneDML` torch module (on CPU, eval mode).
    config
        The model configuration (:class:`genedml_sd.model.GeneDMLConfig`).
    genes
        Predicted genes, in output order.
    encoder
        Reference to the frozen encoder whose features the model reads.
    geometry
        Tile geometry (µm, px) used for the features.
    normalization
        How expression targets were computed (``{"target_sum": ..., "log1p": True}``).
    history
        Per-epoch training losses and validation metrics.
    training
        Training provenance: sections, patients, validation sections, epochs, seconds, device.
    """

    module: Any
    config: Any
    genes: list[str]
    encoder: EncoderRef
    geometry: TileGeometry
    normalization: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    method: str = "gene-dml"

    @property
    def uses_neighbours(self) -> bool:
        """Whether the model reads neighbour-tile features."""
        return bool(self.config.use_neighbour)

    def predict_features(
        self, features: SpotFeatures, *, batch_size: int = 1024, device: str | None = None
    ) -> np.ndarray:
        """Predicted log-normalised expression (n_spots, n_genes) from a slide's cached features."""
        import torch

        if features.dim != self.encoder.embed_dim:
            raise ValueError(
                f"Features have width {features.dim}, but the model was trained on {self.encoder.embed_dim}-d "
                f"features of encoder {self.encoder.name!r}."
            )
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        module = self.module.to(dev).eval()
        neighbour = None
        if self.uses_neighbours:
            if features.neighbour is None:
                raise ValueError("This model needs neighbour features; extract them with neighbours=True.")
            neighbour = features.neighbour  # numpy, possibly memory-mapped: moved to torch batch by batch
        with torch.inference_mode():
            pred = module.predict_slide(
                torch.from_numpy(features.local).float(),
                torch.from_numpy(features.coords_um).float(),
                neighbour,
                batch_size=batch_size,
            )
        self.module.cpu()
        return pred.float().cpu().numpy()

    # ------------------------------------------------------------------------------------------ io
    def save(self, path: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder (``model.pt`` with the weights, ``genedml.json`` with the rest)."""
        import torch

        folder = Path(path)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it.")
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), folder / MODEL_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "genes": list(self.genes),
            "encoder": self.encoder.__dict__,
            "geometry": self.geometry.to_dict(),
            "normalization": self.normalization,
            "history": self.history,
            "training": self.training,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        return folder

    @classmethod
    def load(cls, path: str | PathLike) -> GeneDML:
        """Read a model written by :meth:`save`."""
        import torch

        from genedml_sd.model._methods import get_method

        folder = Path(path)
        meta_file = folder / META_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{folder} is not a saved genedml-sd model (no {META_FILE}).")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder} has model format {meta.get('format')}, expected {FORMAT_VERSION}.")
        config_cls, module_cls, _ = get_method(meta.get("method", "gene-dml"))
        config = config_cls.from_dict(meta["config"])
        module = module_cls(config)
        module.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
        module.eval()
        return cls(
            module=module,
            config=config,
            genes=list(meta["genes"]),
            encoder=EncoderRef(**meta["encoder"]),
            geometry=TileGeometry.from_dict(meta["geometry"]),
            normalization=meta["normalization"],
            history=meta.get("history", []),
            training=meta.get("training", {}),
            method=meta.get("method", "gene-dml"),
        )

    def __repr__(self) -> str:
        scales = [s for s in ("local", "neighbour", "global") if getattr(self.config, f"use_{s}", False)]
        return (
            f"GeneDML(method={self.method!r}, {len(self.genes)} genes, encoder={self.encoder.name!r}, scales={scales}, "
            f"tiles={self.geometry.key()}, trained on {self.training.get('sections', '?')})"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
