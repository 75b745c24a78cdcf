"""A training batch as the module sees it: spots of one slide or of several, gathered on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._data import SlideTensors


@dataclass
class SlidePart:
    """The spots of one slide within a training batch.

    Attributes
    ----------
    slide
        The whole training slide (host tensors), for methods with slide-level context.
    slide_index
        Its index among the training slides.
    index
        Spot indices within the slide, int64 (b,) on the CPU, sorted.
    positions
        Where these spots sit in the batch: a slice of the batch's rows (a batch is ordered by slide).
    context
        What :meth:`SlideModule.slide_context` returned for this slide (computed once per training run).
    """

    slide: SlideTensors
    slide_index: int
    index: torch.Tensor
    positions: slice
    context: Any = None


@dataclass
class SpotBatch:
    """One training batch, gathered on the module's device: spots of one slide, or of several.

    Batches come from one slide unless training mixes slides (``TrainArgs(mix_slides=True)``); then
    ``parts`` holds one :class:`SlidePart` per slide in the batch, in batch order. Methods that read
    slide-level data should loop over ``parts``; the one-slide shortcuts (``slide``, ``slide_index``,
    ``index``, ``context``) raise a ValueError on a mixed batch.

    Attributes
    ----------
    parts
        The batch's spots per slide, ordered as the rows of ``local`` / ``expr``.
    local
        Local-tile features (B, D) on the device.
    expr
        Log-normalised expression (B, G) on the device.
    neighbour
        Neighbour-grid features (B, n_neighbours, D) on the device if ``config.use_neighbour``, else ``None``.
    """

    parts: tuple[SlidePart, ...]
    local: torch.Tensor
    expr: torch.Tensor
    neighbour: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of spots B."""
        return int(self.local.shape[0])

    @property
    def mixed(self) -> bool:
        """Whether the batch holds spots of more than one slide."""
        return len(self.parts) > 1

    def _single(self, what: str) -> SlidePart:
        if len(self.parts) != 1:
            raise ValueError(
                f"SpotBatch.{what} is defined for a one-slide batch, but this batch mixes {len(self.parts)} slides "
                "(TrainArgs(mix_slides=True)): loop over batch.parts instead."
            )
        return self.parts[0]

    @property
    def slide(self) -> SlideTensors:
        """The batch's slide (one-slide batches)."""
        return self._single("slide").slide

    @property
    def slide_index(self) -> int:
        """Index of the batch's slide among the training slides (one-slide batches)."""
        return self._single("slide_index").slide_index

    @property
    def index(self) -> torch.Tensor:
        """Spot indices within the slide, int64 (B,) on the CPU, sorted (one-slide batches)."""
        return self._single("index").index

    @property
    def context(self) -> Any:
        """The slide's :meth:`SlideModule.slide_context` (one-slide batches)."""
        return self._single("context").context
