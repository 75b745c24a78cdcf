"""From SpatialData to the tensors the model layer needs (features, coordinates, expression)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import (
    check_observations,
    infer_shapes_key,
    resolve_key,
    sample_info,
    table_annotating,
    table_rows_for_shapes,
)
from genedml_sd.pp import normalized_expression

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder
    from genedml_sd.model import SlideTensors

    from ._features import FeatureSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideKeys:
    """The elements of one slide: image, spots and (optional) counts table."""

    image_key: str
    shapes_key: str
    table_key: str | None


def resolve_slide_keys(
    sdata: SpatialData,
    image_key: str | None,
    shapes_key: str | None,
    table_key: str | None,
    *,
    need_table: bool,
) -> SlideKeys:
    """Resolve (or infer when unambiguous) the image, shapes and counts table of one slide.

    Tables written by :func:`genedml_sd.tl.predict` are never taken as counts.
    """
    image_key = resolve_key(sdata, "images", image_key)
    shapes_key = infer_shapes_key(sdata, shapes_key, table_key)
    check_observations(sdata[shapes_key], shapes_key)
    if need_table:
        table_key = table_annotating(sdata, shapes_key, table_key)
    elif table_key is not None:
        resolve_key(sdata, "tables", table_key)
    return SlideKeys(image_key, shapes_key, table_key)


def slide_expression(
    sdata: SpatialData, keys: SlideKeys, genes: Sequence[str], *, layer: str | None = None
) -> np.ndarray:
    """Log-normalised expression of ``genes`` for the spots of ``keys.shapes_key``, in shapes order, (n_spots, G)."""
    if keys.table_key is None:
        raise ValueError(f"No counts table was resolved for {keys.shapes_key!r}.")
    table = sdata.tables[keys.table_key]
    rows = table_rows_for_shapes(table, sdata[keys.shapes_key], keys.shapes_key, keys.table_key)
    sub = table[rows]
    return normalized_expression(sub, genes, table_key=keys.table_key, layer=layer, slide=keys.shapes_key)


def slide_info(sdata: SpatialData, keys: SlideKeys) -> dict[str, Any]:
    """Sample metadata (patient, section, ...) of a slide, from its counts table, with fallbacks."""
    return sample_info(sdata, keys.shapes_key, keys.table_key)


def slide_tensors(
    slides: Sequence[SpatialData],
    keys: Sequence[SlideKeys],
    spec: FeatureSpec,
    encoder: FrozenEncoder | None,
    *,
    genes: Sequence[str] | None,
    names: Sequence[str],
    layer: str | None = None,
    extraction: dict[str, Any] | None = None,
) -> list[SlideTensors]:
    """The model layer's input for a list of slides: cached features, µm coordinates and (optionally) targets.

    Parameters
    ----------
    slides, keys
        The slides and their elements.
    spec
        How features are made (encoder, geometry, mode, whether neighbour grids are read).
    encoder
        The loaded frozen encoder of ``spec`` (``None`` in mode ``"table"``: features from a table).
    genes
        Target genes (log-normalised expression of each slide's counts table), or ``None`` for features only.
    names
        Slide names (for logs and errors).
    layer
        Layer of the counts tables holding raw counts (default ``X``).
    extraction
        ``cache_dir``, ``num_workers``, ``device`` of the feature extraction.

    Returns
    -------
    One :class:`~genedml_sd.model.SlideTensors` per slide: ``local`` (N, D), ``neighbour`` (N, T, D), a
    :class:`~genedml_sd.model.TokenGrid` (dense mode) or ``None``, ``coords`` (N, 2) in µm, ``expr`` (N, G) or ``None``.
    """
    from genedml_sd.model import SlideTensors, TokenGrid

    feats = spec.extract_many(
        [(s, k.image_key, k.shapes_key) for s, k in zip(slides, keys, strict=True)], encoder, **(extraction or {})
    )
    out = []
    for s, k, f, name in zip(slides, keys, feats, names, strict=True):
        f = spec.standardise(f)  # per-slide standardisation when the spec asks for it
        expr = None if genes is None else slide_expression(s, k, genes, layer=layer)
        neighbour = None
        if spec.neighbours:  # dense-mode tokens stay one per lattice tile, gathered per batch
            neighbour = (
                TokenGrid(f.tokens, f.token_index)
                if f.tokens is not None and f.token_index is not None
                else f.neighbour
            )
        out.append(
            SlideTensors.from_numpy(
                local=f.local,
                neighbour=neighbour,
                coords=f.coords_um,
                expr=expr,
                name=str(name),
            )
        )
    return out


def as_list(sdata: SpatialData | Sequence[SpatialData]) -> list[SpatialData]:
    """Accept one SpatialData or a sequence of them."""
    from spatialdata import SpatialData

    if isinstance(sdata, SpatialData):
        return [sdata]
    items = list(sdata)
    bad = [type(s).__name__ for s in items if not isinstance(s, SpatialData)]
    if not items or bad:
        raise TypeError(f"Expected a SpatialData or a non-empty list of them, got {bad or 'an empty list'}.")
    return items
