"""The typed feature specification a model is trained on: encoder, tile geometry, feature mode, scales.

A :class:`FeatureSpec` is made once by :func:`genedml_sd.tl.fit`, stored on the trained model, and used
unchanged by :func:`~genedml_sd.tl.predict` and :func:`~genedml_sd.tl.cross_validate`, so features are
always computed the way the model was trained on them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd.tiling import TileGeometry

if TYPE_CHECKING:
    from os import PathLike

    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder, SpotFeatures

logger = logging.getLogger(__name__)

FEATURE_MODES = ("spot", "lattice", "dense")
"""``"spot"``: every spot's own 5x5 neighbour grid (the paper's); ``"lattice"``: a tile lattice encoded once,
exact spot-centred local tiles; ``"dense"``: only the lattice, local features read from it at each observation."""

TABLE_MODE = "table"
"""Mode of features read from a table of precomputed tile embeddings (sopa, LazySlide), see :func:`table_features`."""

AUTO_DENSE_TILES_PER_OBS = 0.5
"""``feature_mode="auto"`` picks ``"dense"`` when the lattice has at most this many tiles per observation."""


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
    tta
        Test-time augmentation of the tiles (``"d4"``) or ``None``.
    stain_norm
        The stain normaliser of the tiles (:meth:`StainNormalizer.to_dict
        <genedml_sd.encoders.StainNormalizer.to_dict>`) or ``None``.
    """

    name: str
    pretrained: bool
    weights: str | None
    fingerprint: str
    embed_dim: int
    tta: str | None = None
    stain_norm: dict[str, Any] | None = None

    @classmethod
    def of(cls, encoder: FrozenEncoder, *, pretrained: bool, weights: str | None) -> EncoderRef:
        """Reference of a loaded encoder (with its tile transforms)."""
        stain = None if encoder.stain_norm is None else encoder.stain_norm.to_dict()
        return cls(
            encoder.name, bool(pretrained), weights, encoder.fingerprint, int(encoder.embed_dim), encoder.tta, stain
        )

    def load(self, **kwargs: Any) -> FrozenEncoder:
        """Load the encoder again (``kwargs`` such as ``hf_token`` go to :func:`~genedml_sd.encoders.load_encoder`)."""
        from genedml_sd.encoders import StainNormalizer, load_encoder

        stain = None if self.stain_norm is None else StainNormalizer.from_dict(self.stain_norm)
        return load_encoder(
            self.name, pretrained=self.pretrained, weights=self.weights, tta=self.tta, stain_norm=stain, **kwargs
        )

    def check(self, encoder: FrozenEncoder) -> None:
        """Raise a ``ValueError`` if ``encoder`` is not this one (another architecture or weights)."""
        if encoder.fingerprint != self.fingerprint:
            raise ValueError(
                f"Encoder {encoder.name!r} (fingerprint {encoder.fingerprint}) is not the one the model was trained "
                f"with ({self.name!r}, fingerprint {self.fingerprint})."
            )


@dataclass(frozen=True)
class FeatureSpec:
    """Which frozen-encoder features a model reads, and how they are made.

    Attributes
    ----------
    encoder
        The frozen encoder (name, weights, fingerprint, width D).
    geometry
        Tile geometry: tile side in µm and px, neighbour grid size.
    mode
        ``"spot"`` (each spot's own neighbour grid, ``grid**2`` encoder calls per spot), ``"lattice"``
        (a tile lattice over the tissue encoded once, neighbour tokens gathered from it, local tiles
        centred on each spot) or ``"dense"`` (the lattice only: local features read from it at each
        observation, see :func:`~genedml_sd.encoders.extract_features`) or ``"table"`` (embeddings
        precomputed by sopa or LazySlide, read from the table ``table["key"]`` of each slide).
    neighbours
        Whether neighbour-grid features are read (``False`` for local-only methods).
    table
        Mode ``"table"``: the feature table the model was trained on (``key``, ``source``,
        ``model_name``, ``tiles_key``, ``dim`` and the producer's tile settings); ``None`` otherwise.
    slide_standardise
        Standardise every slide's features by that slide's own statistics (:meth:`standardise`) before the
        model sees them, in training and in prediction, so that a slide-wide shift of the features (a
        darker stain, another scanner) is removed. Label-free, so no test-set leakage, but a slide must
        hold enough tissue for its statistics (a few hundred observations). Not part of the cache key.
    """

    encoder: EncoderRef
    geometry: TileGeometry
    mode: str = "spot"
    neighbours: bool = True
    table: dict[str, Any] | None = None
    slide_standardise: bool = False

    def __post_init__(self) -> None:
        if self.mode not in (*FEATURE_MODES, TABLE_MODE):
            raise ValueError(f"feature_mode must be one of {list(FEATURE_MODES)}, got {self.mode!r}.")
        if (self.mode == TABLE_MODE) != (self.table is not None):
            raise ValueError("A feature spec has a feature table exactly when its mode is 'table'.")

    @property
    def scales(self) -> tuple[str, ...]:
        """The feature scales read from the cache, ``("local",)`` or ``("local", "neighbour")``."""
        return ("local", "neighbour") if self.neighbours else ("local",)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict."""
        return {
            "encoder": asdict(self.encoder),
            "geometry": self.geometry.to_dict(),
            "mode": self.mode,
            "neighbours": self.neighbours,
            "table": None if self.table is None else dict(self.table),
            **({"slide_standardise": True} if self.slide_standardise else {}),  # older models: absent
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            encoder=EncoderRef(**d["encoder"]),
            geometry=TileGeometry.from_dict(d["geometry"]),
            mode=str(d.get("mode", "spot")),
            neighbours=bool(d.get("neighbours", True)),
            table=d.get("table"),
            slide_standardise=bool(d.get("slide_standardise", False)),
        )

    def standardise(self, features: SpotFeatures) -> SpotFeatures:
        """The slide's features as the model reads them: unchanged, or standardised by the slide itself.

        With :attr:`slide_standardise`, every feature dimension becomes ``(x - m) / s`` where ``m`` and
        ``s`` are the mean and (unbiased) standard deviation of the slide's local features (n_obs, D), in
        float64 then float32; the same shift and scale are applied to its neighbour features (n_obs, T, D)
        and dense-mode tokens. Returns new arrays (a copy in memory); the cached features are not changed.
        """
        if not self.slide_standardise:
            return features
        import dataclasses

        local = np.asarray(features.local)
        if local.shape[0] < 2:
            raise ValueError("slide_standardise needs at least 2 observations per slide.")
        mean = local.mean(axis=0, dtype=np.float64)
        std = np.sqrt(np.mean(np.square(local - mean), axis=0) * local.shape[0] / (local.shape[0] - 1))
        std = np.where(std > 1e-6, std, 1.0)

        def scaled(x: Any) -> Any:
            return None if x is None else ((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)

        return dataclasses.replace(
            features, local=scaled(local), neighbour=scaled(features.neighbour), tokens=scaled(features.tokens)
        )

    @classmethod
    def from_table(
        cls,
        slides: Sequence[tuple[SpatialData, str]],
        features_key: str,
        geometry: TileGeometry,
        *,
        neighbours: bool,
    ) -> FeatureSpec:
        """The spec of features read from the table ``features_key`` of every slide ``(sdata, name)``.

        Every slide's table must hold embeddings of the same model and width; the first slide's table
        is recorded (see :func:`~genedml_sd.tl.describe_feature_table`).
        """
        from ._imported import describe_feature_table, table_summary

        infos = [describe_feature_table(s, features_key) for s, _ in slides]
        first = infos[0]
        for (_, name), info in zip(slides, infos, strict=True):
            if (info.model_name, info.dim) != (first.model_name, first.dim):
                raise ValueError(
                    f"Feature table {features_key!r} of slide {name!r} holds {info.dim}-d embeddings of "
                    f"{info.encoder_name!r}, but the first slide's holds {first.dim}-d embeddings of "
                    f"{first.encoder_name!r}; train on embeddings of one model."
                )
        ref = EncoderRef(first.encoder_name, True, None, f"table:{first.encoder_name}:{first.dim}", first.dim)
        return cls(ref, geometry, TABLE_MODE, neighbours=neighbours, table=table_summary(slides[0][0], features_key))

    def extraction_kwargs(
        self,
        *,
        cache_dir: str | PathLike | None = None,
        num_workers: int | None = None,
        device: str | None = None,
        neighbours: bool | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments of :func:`~genedml_sd.encoders.extract_features` for this spec."""
        return {
            "geometry": self.geometry,
            "neighbours": self.neighbours if neighbours is None else neighbours,
            "mode": self.mode,
            "cache_dir": cache_dir,
            "num_workers": num_workers,
            "device": device,
        }

    def extract(
        self,
        sdata: SpatialData,
        encoder: FrozenEncoder | None,
        *,
        image_key: str,
        shapes_key: str,
        neighbours: bool | None = None,
        **kwargs: Any,
    ) -> SpotFeatures:
        """Cached features of one slide (see :func:`~genedml_sd.encoders.extract_features`).

        In mode ``"table"``, ``encoder`` is ``None`` and the features are read from the slide's table
        ``features_key`` (default: the one of training), see :func:`table_features`.
        """
        from genedml_sd.encoders import extract_features

        if self.mode == TABLE_MODE:
            return self.read_table(sdata, image_key=image_key, shapes_key=shapes_key, neighbours=neighbours)
        if encoder is None:
            raise ValueError(f"Features of mode {self.mode!r} are computed by an encoder: pass one.")
        self.encoder.check(encoder)
        return extract_features(
            sdata,
            encoder,
            image_key=image_key,
            shapes_key=shapes_key,
            **self.extraction_kwargs(neighbours=neighbours, **kwargs),
        )

    def extract_many(
        self,
        slides: Sequence[tuple[SpatialData, str, str]],
        encoder: FrozenEncoder | None,
        *,
        neighbours: bool | None = None,
        **kwargs: Any,
    ) -> list[SpotFeatures]:
        """Cached features of several ``(sdata, image_key, shapes_key)``; shared across processes of a launch.

        See :func:`~genedml_sd.encoders.extract_features_sharded`.
        """
        from genedml_sd.encoders import extract_features_sharded

        if self.mode == TABLE_MODE:
            return [self.read_table(s, image_key=i, shapes_key=k, neighbours=neighbours) for s, i, k in slides]
        if encoder is None:
            raise ValueError(f"Features of mode {self.mode!r} are computed by an encoder: pass one.")
        self.encoder.check(encoder)
        return extract_features_sharded(
            list(slides), encoder, **self.extraction_kwargs(neighbours=neighbours, **kwargs)
        )

    def read_table(
        self,
        sdata: SpatialData,
        *,
        image_key: str,
        shapes_key: str,
        features_key: str | None = None,
        neighbours: bool | None = None,
    ) -> SpotFeatures:
        """Mode ``"table"``: the features of one slide from its table of tile embeddings.

        The table (``features_key``, default the key of training) must hold embeddings of the same
        model and width as the one of training; otherwise a ``ValueError`` names both.
        """
        from ._imported import describe_feature_table, table_features

        assert self.table is not None
        key = features_key or str(self.table["key"])
        info = describe_feature_table(sdata, key)
        if info.model_name != self.table["model_name"] or info.dim != int(self.table["dim"]):
            raise ValueError(
                f"Feature table {key!r} holds {info.dim}-d embeddings of {info.encoder_name!r}, but the model was "
                f"trained on {self.table['dim']}-d embeddings of "
                f"'{self.table['source']}:{self.table['model_name']}' (table {self.table['key']!r})."
            )
        return table_features(
            sdata,
            key,
            image_key=image_key,
            shapes_key=shapes_key,
            grid=self.geometry.grid,
            neighbours=self.neighbours if neighbours is None else neighbours,
        )


def choose_feature_mode(
    mode: str,
    slides: Sequence[tuple[SpatialData, str, str]],
    geometry: TileGeometry,
    *,
    neighbours: bool,
) -> tuple[str, dict[str, Any]]:
    """Resolve ``feature_mode="auto"`` for a set of slides from the encoder calls each mode would cost.

    ``"dense"`` when the lattice has at most ``AUTO_DENSE_TILES_PER_OBS`` (0.5) tiles per observation
    (observations denser than tiles: Visium HD bins, cells, fine grids); else ``"lattice"`` when the
    model reads neighbour tokens and that costs fewer calls than ``"spot"`` (legacy ST, Visium); else
    ``"spot"`` (local-only methods on spots that do not share tiles). Counting reads spot centres and
    image metadata only (see :func:`~genedml_sd.encoders.encoder_calls`).

    Parameters
    ----------
    mode
        ``"auto"`` or one of ``"spot"``, ``"lattice"``, ``"dense"`` (returned unchanged).
    slides
        ``(sdata, image_key, shapes_key)`` of every slide.
    geometry
        Tile geometry.
    neighbours
        Whether the model reads neighbour tokens.

    Returns
    -------
    ``(mode, calls)``: the mode and, for ``"auto"``, the encoder calls of every mode summed over the
    slides plus ``"observations"`` (an empty dict otherwise).
    """
    if mode != "auto":
        if mode not in FEATURE_MODES:
            raise ValueError(f"feature_mode must be 'auto' or one of {list(FEATURE_MODES)}, got {mode!r}.")
        return mode, {}
    from genedml_sd.encoders import encoder_calls

    calls: dict[str, int] = dict.fromkeys(FEATURE_MODES, 0)
    n_obs = 0
    for sdata, image_key, shapes_key in slides:
        per = encoder_calls(sdata, image_key=image_key, shapes_key=shapes_key, geometry=geometry, neighbours=neighbours)
        for m in FEATURE_MODES:
            calls[m] += int(per[m])
        n_obs += len(sdata[shapes_key])
    if calls["dense"] <= AUTO_DENSE_TILES_PER_OBS * n_obs:
        chosen = "dense"
    elif neighbours and calls["lattice"] < calls["spot"]:
        chosen = "lattice"
    else:
        chosen = "spot"
    per_obs = {m: calls[m] / max(n_obs, 1) for m in FEATURE_MODES}
    logger.info(
        "feature_mode='auto' chose %r: %.3g encoder calls per observation (spot %.3g, lattice %.3g, dense %.3g) "
        "for %d observations",
        chosen,
        per_obs[chosen],
        per_obs["spot"],
        per_obs["lattice"],
        per_obs["dense"],
        n_obs,
    )
    return chosen, {**calls, "observations": n_obs}
