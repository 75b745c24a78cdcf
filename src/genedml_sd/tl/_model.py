"""The user-facing trained model: weights + everything needed to predict on new slides, saved as a folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd.tiling import TileGeometry

from ._features import EncoderRef, FeatureSpec

if TYPE_CHECKING:
    from genedml_sd.encoders import SpotFeatures

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "genedml.json"
FORMAT_VERSION = 2
"""Version 2 stores the feature spec, the package version and the weights' checksum; version 1 still loads."""


@dataclass
class TrainedModel:
    """A trained model (Gene-DML, NH2ST or a baseline) with its genes, normalisation and feature spec.

    Returned by :func:`genedml_sd.tl.fit`; pass it to :func:`genedml_sd.tl.predict`. Save it with
    :meth:`save` and restore it with :meth:`load`.

    Attributes
    ----------
    module
        The trained torch module of the method (e.g. :class:`genedml_sd.model.GeneDML`; CPU, eval mode).
    config
        The method's configuration (e.g. :class:`genedml_sd.model.GeneDMLConfig`).
    genes
        Predicted genes, in output order.
    features
        Which frozen-encoder features the model reads and how they are made
        (:class:`~genedml_sd.tl.FeatureSpec`: encoder, tile geometry in µm / px, feature mode).
    normalization
        How expression targets were computed (``{"target_sum": ..., "log1p": True}``).
    history
        Per-epoch training losses and validation metrics.
    training
        Training provenance: sections, patients, validation sections, epochs, seconds, device, gene ranking,
        and ``selection``: what was chosen on the validation sections after training (e.g. the predictor
        of Gene-DML's ``predictor="auto"`` with each candidate's validation PCC).
    method
        Name of the method in the registry (:func:`genedml_sd.tl.list_methods`).
    """

    module: Any
    config: Any
    genes: list[str]
    features: FeatureSpec
    normalization: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    method: str = "gene-dml"

    @property
    def encoder(self) -> EncoderRef:
        """The frozen encoder of :attr:`features`."""
        return self.features.encoder

    @property
    def geometry(self) -> TileGeometry:
        """The tile geometry of :attr:`features`."""
        return self.features.geometry

    @property
    def uses_neighbours(self) -> bool:
        """Whether the model reads neighbour-tile features."""
        return bool(self.features.neighbours)

    def predict_features(
        self, features: SpotFeatures, *, batch_size: int = 1024, device: str | None = None
    ) -> np.ndarray:
        """Predicted log-normalised expression, float32 (n_spots, n_genes), from a slide's cached features.

        Predictions are made ``batch_size`` rows at a time and written into the result, so beyond it
        memory holds one batch (and, for Gene-DML on large slides, its bounded slide context).
        """
        import torch

        features = self.features.standardise(features)  # by the slide's own statistics, if trained so
        if features.dim != self.encoder.embed_dim:
            raise ValueError(
                f"Features have width {features.dim}, but the model was trained on {self.encoder.embed_dim}-d "
                f"features of encoder {self.encoder.name!r}."
            )
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        module = self.module.to(dev).eval()
        from genedml_sd.model import TokenGrid

        neighbour: Any = None
        if self.uses_neighbours:
            if (
                features.tokens is not None and features.token_index is not None
            ):  # dense mode: one token per lattice tile, gathered per batch
                neighbour = TokenGrid(features.tokens, features.token_index)
            elif features.neighbour is None:
                raise ValueError("This model needs neighbour features; extract them with neighbours=True.")
            else:
                neighbour = features.neighbour  # numpy, possibly memory-mapped: moved to torch batch by batch
        # dense mode: batch the observations of one lattice tile together (their neighbour grids are one)
        order = None
        if isinstance(neighbour, TokenGrid):
            order = np.argsort(neighbour.index[:, neighbour.index.shape[1] // 2].numpy(), kind="stable")
        # predictions go chunk by chunk into one float32 host array: nothing (N, G) on the device
        pred = np.empty((features.n_spots, len(self.genes)), dtype=np.float32)
        with torch.inference_mode():
            chunks = module.iter_predictions(
                torch.from_numpy(features.local).float(),
                torch.from_numpy(features.coords_um).float(),
                neighbour,
                batch_size=batch_size,
                order=order,
            )
            for rows, chunk in chunks:
                pred[rows] = chunk.cpu().numpy()
        self.module.cpu()
        return pred

    # ------------------------------------------------------------------------------------------ io
    def save(self, path: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``model.pt`` (weights) and ``genedml.json`` (everything else).

        ``genedml.json`` records the package version and the SHA-256 of ``model.pt``, checked by :meth:`load`.
        Both files are written to temporary names first and renamed, so an interrupted save never leaves a
        half-written model under the final names.
        """
        import torch

        from genedml_sd import __version__

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder.")
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it.")
        folder.mkdir(parents=True, exist_ok=True)
        tmp_weights = folder / f".{MODEL_FILE}.{os.getpid()}.tmp"
        torch.save(self.module.state_dict(), tmp_weights)
        meta = {
            "format": FORMAT_VERSION,
            "genedml_sd_version": __version__,
            "method": self.method,
            "config": self.config.to_dict(),
            "genes": list(self.genes),
            "features": self.features.to_dict(),
            "weights_sha256": _sha256(tmp_weights),
            "normalization": self.normalization,
            "history": self.history,
            "training": self.training,
        }
        tmp_meta = folder / f".{META_FILE}.{os.getpid()}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1, default=_json_default))
        os.replace(tmp_weights, folder / MODEL_FILE)
        os.replace(tmp_meta, folder / META_FILE)
        return folder

    @classmethod
    def load(cls, path: str | PathLike) -> TrainedModel:
        """Read a model written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If the folder has no ``genedml.json`` or ``model.pt``.
        ValueError
            If a file is truncated or corrupted (invalid JSON, weights that do not match the recorded
            checksum or cannot be read), the gene list does not match the prediction head's width, or the
            weights do not fit the recorded configuration.
        KeyError
            If the method is not registered (a method of another package: import it first).
        """
        import torch

        from genedml_sd.model import get_method

        folder = Path(path)
        meta_file, weights_file = folder / META_FILE, folder / MODEL_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{folder} is not a saved genedml-sd model (no {META_FILE}).")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_file} is not valid JSON (truncated or corrupted?): {err}.") from err
        if meta.get("format") not in (1, FORMAT_VERSION):
            raise ValueError(f"{folder} has model format {meta.get('format')}, expected {FORMAT_VERSION}.")
        _check_version(meta.get("genedml_sd_version"), meta_file)
        if not weights_file.exists():
            raise FileNotFoundError(f"{folder} has {META_FILE} but no {MODEL_FILE} (the weights).")
        expected = meta.get("weights_sha256")
        if expected is not None and _sha256(weights_file) != expected:
            raise ValueError(
                f"{weights_file} does not match the checksum recorded in {META_FILE} (truncated, or replaced "
                "after saving); save the model again."
            )
        method = meta.get("method", "gene-dml")
        spec = get_method(method)
        config = spec.config.from_saved(meta["config"])
        genes = [str(g) for g in meta["genes"]]
        n_genes = getattr(config, "n_genes", None)
        if n_genes is not None and int(n_genes) != len(genes):
            raise ValueError(
                f"{meta_file} lists {len(genes)} genes but the model's prediction head has width {n_genes}."
            )
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Cannot read the weights {weights_file} (truncated or corrupted?): {err}") from err
        module = spec.module(config)
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"The weights in {weights_file} do not fit the configuration in {META_FILE}: {err}"
            ) from err
        module.eval()
        return cls(
            module=module,
            config=config,
            genes=genes,
            features=_features_of(meta),
            normalization=meta["normalization"],
            history=meta.get("history", []),
            training=meta.get("training", {}),
            method=method,
        )

    def __repr__(self) -> str:
        scales = list(getattr(self.config, "scales", ()))
        return (
            f"TrainedModel(method={self.method!r}, {len(self.genes)} genes, encoder={self.encoder.name!r}, "
            f"scales={scales}, features={self.features.mode!r}, tiles={self.geometry.key()}, "
            f"trained on {self.training.get('sections', '?')})"
        )


def _features_of(meta: dict[str, Any]) -> FeatureSpec:
    """The feature spec of a saved model (format 2), or rebuilt from the fields of format 1."""
    if "features" in meta:
        return FeatureSpec.from_dict(meta["features"])
    neighbours = bool(meta["config"].get("use_neighbour", False))
    return FeatureSpec(
        encoder=EncoderRef(**meta["encoder"]),
        geometry=TileGeometry.from_dict(meta["geometry"]),
        mode=str(meta.get("training", {}).get("feature_mode", "spot")),
        neighbours=neighbours,
    )


def _check_version(saved: str | None, meta_file: Path) -> None:
    """Warn when a model was written by another minor version of the package."""
    from genedml_sd import __version__

    if saved is None:
        warnings.warn(f"{meta_file} records no genedml-sd version (written before 0.2).", UserWarning, stacklevel=3)
        return
    if saved.split(".")[:2] != __version__.split(".")[:2]:
        warnings.warn(
            f"{meta_file} was written by genedml-sd {saved}; this is {__version__}. Predictions may differ.",
            UserWarning,
            stacklevel=3,
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
