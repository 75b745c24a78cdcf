"""From SpatialData to the tensors the model layer needs (features, coordinates, expression)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genedml_sd._spatial import (
    ATTRS_KEY,
    check_circles,
    resolve_key,
    table_annotating,
    table_rows_for_shapes,
)
from genedml_sd.pp import normalized_expression

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from genedml_sd.encoders import FrozenEncoder
    from genedml_sd.encoders._extract import SpotFeatures
    from genedml_sd.tiling import TileGeometry


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
    """Resolve (or infer when unambiguous) the image, shapes and table of one slide."""
    image_key = resolve_key(sdata, "images", image_key)
    if shapes_key is None and table_key is not None:
        from spatialdata.models import get_table_keys

        region = get_table_keys(sdata.tables[resolve_key(sdata, "tables", table_key)])[0]
        regions = [region] if isinstance(region, str) else list(region)
        if len(regions) == 1 and regions[0] in sdata.shapes:
            shapes_key = regions[0]
    if shapes_key is None:
        circles = [k for k, v in sdata.shapes.items() if "radius" in v.columns]
        if len(circles) == 1:
            shapes_key = circles[0]
    shapes_key = resolve_key(sdata, "shapes", shapes_key)
    check_circles(sdata[shapes_key], shapes_key)
    if need_table:
        table_key = table_annotating(sdata, shapes_key, table_key)
    elif table_key is not None:
        resolve_key(sdata, "tables", table_key)
    return SlideKeys(image_key, shapes_key, table_key)


def slide_expression(sdata: SpatialData, keys: SlideKeys, genes: Sequence[str]) -> np.ndarray:
    """Log-normalised expression of ``genes`` for the spots of ``keys.shapes_key``, in shapes order."""
    table = sdata.tables[keys.table_key]
    rows = table_rows_for_shapes(table, sdata[keys.shapes_key], keys.shapes_key, keys.table_key)
    sub = table[rows]
    return normalized_expression(sub, genes, table_key=keys.table_key)


def slide_info(sdata: SpatialData, keys: SlideKeys) -> dict[str, Any]:
    """Sample metadata (patient, section, ...) of a slide, from its table, with fallbacks."""
    info: dict[str, Any] = {}
    if keys.table_key is not None:
        table = sdata.tables[keys.table_key]
        info.update(table.uns.get(ATTRS_KEY, {}))
        for col in ("patient", "section", "sample"):
            if col not in info and col in table.obs and table.obs[col].nunique() == 1:
                info[col] = str(table.obs[col].iloc[0])
    info.setdefault("section", keys.shapes_key)
    info.setdefault("patient", info["section"])
    return info


def shapes_sample_info(sdata: SpatialData, keys: SlideKeys, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Sample metadata for a slide without a chosen table: from the first table annotating the spots."""
    for name, table in sdata.tables.items():
        if name in exclude:
            continue
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if keys.shapes_key in regions:
            return slide_info(sdata, SlideKeys(keys.image_key, keys.shapes_key, name))
    return slide_info(sdata, keys)


def slide_features(
    sdata: SpatialData,
    keys: SlideKeys,
    encoder: FrozenEncoder,
    geometry: TileGeometry,
    *,
    neighbours: bool,
    extraction: dict[str, Any],
) -> SpotFeatures:
    """Cached frozen-encoder features of a slide (see :func:`genedml_sd.encoders.extract_features`)."""
    from genedml_sd.encoders import extract_features

    return extract_features(
        sdata,
        encoder,
        image_key=keys.image_key,
        shapes_key=keys.shapes_key,
        geometry=geometry,
        neighbours=neighbours,
        **extraction,
    )


def slides_features(
    slides: Sequence[SpatialData],
    keys: Sequence[SlideKeys],
    encoder: FrozenEncoder,
    geometry: TileGeometry,
    *,
    neighbours: bool,
    extraction: dict[str, Any],
) -> list[SpotFeatures]:
    """Cached features of several slides; in a multi-process launch each process encodes a share.

    See :func:`genedml_sd.encoders.extract_features_sharded`.
    """
    from genedml_sd.encoders import extract_features_sharded

    return extract_features_sharded(
        [(s, k.image_key, k.shapes_key) for s, k in zip(slides, keys, strict=True)],
        encoder,
        geometry=geometry,
        neighbours=neighbours,
        **extraction,
    )


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
