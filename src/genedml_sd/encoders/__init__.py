"""Frozen tile encoders: a registry of pathology foundation models, loading and cached feature extraction.

``load_encoder("uni")`` gives the paper's encoder (gated on the Hugging Face Hub: accept its licence
and log in, or pass ``weights=`` a local file); ``load_encoder("stain-texture")`` is a weight-free
H&E descriptor that works offline. :func:`extract_features` encodes the spots of a slide and caches
the features on disk, keyed by the slide, the encoder's :attr:`FrozenEncoder.fingerprint` and the
tile geometry; its ``mode="dense"`` gives observations smaller than a tile (Visium HD bins, cells) a
feature at their own position from a tile lattice encoded once, and :func:`encoder_calls` tells, from
metadata only, how many tiles each mode would encode.
"""

from ._catalogue import UnknownEncoderError, get_spec, list_encoders, load_encoder, register_encoder, wrap_encoder
from ._dense import encoder_calls
from ._distributed import extract_features_sharded, process_rank
from ._extract import SpotFeatures, extract_features
from ._frozen import FrozenEncoder
from ._specs import EncoderSpec
from ._transforms import TTA_MODES, StainNormalizer, fit_stain_normalizer
from ._weights import EncoderWeightsError

__all__ = [
    "EncoderSpec",
    "EncoderWeightsError",
    "FrozenEncoder",
    "StainNormalizer",
    "TTA_MODES",
    "SpotFeatures",
    "UnknownEncoderError",
    "encoder_calls",
    "extract_features",
    "extract_features_sharded",
    "fit_stain_normalizer",
    "get_spec",
    "list_encoders",
    "load_encoder",
    "process_rank",
    "register_encoder",
    "wrap_encoder",
]
