"""Training data of the model layer: per-slide tensors and spot batches (within one slide or mixed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch.utils.data import Dataset


def _tensor(a: torch.Tensor | np.ndarray, dtype: type) -> torch.Tensor:
    """A tensor of ``a``; numpy arrays are converted to ``dtype``, read-only ones (memory-mapped caches) copied."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a if a.flags.writeable else np.array(a))


class TokenGrid:
    """Neighbour tokens stored once per lattice tile: token ``t`` of spot ``i`` is ``tokens[index[i, t]]``.

    Behaves like the (N, T, D) neighbour tensor it stands for where the training plan and
    :meth:`~genedml_sd.model.SlideModule.predict_slide` read it (``shape``, ``ndim``, row indexing with
    an index tensor, an array or a slice, which gathers only those rows), while holding M x D floats
    and N x T integers instead of N x T x D floats (100 GB at 10^6 spots x 25 tokens x 1024).

    Parameters
    ----------
    tokens
        Features of the lattice tiles, float32 (M, D) (tensor or numpy array).
    index
        Lattice tile of every spot's neighbour token, integers in ``[0, M)``, (N, T).
    """

    def __init__(self, tokens: torch.Tensor | np.ndarray, index: torch.Tensor | np.ndarray) -> None:
        self.tokens = _tensor(tokens, np.float32).float()
        self.index = _tensor(index, np.int64).long()
        if self.tokens.ndim != 2 or self.index.ndim != 2:
            raise ValueError(
                f"TokenGrid needs tokens (M, D) and index (N, T), got {tuple(self.tokens.shape)} and "
                f"{tuple(self.index.shape)}."
            )
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= self.tokens.shape[0]):
            raise ValueError(f"TokenGrid index must lie in [0, {self.tokens.shape[0]}) (the number of tokens).")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, T, D)`` of the gathered neighbour tensor."""
        return (self.index.shape[0], self.index.shape[1], self.tokens.shape[1])

    @property
    def ndim(self) -> int:
        """3, as the (N, T, D) tensor."""
        return 3

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        """Neighbour tokens (B, T, D) of the spots ``rows``."""
        idx = self.index[torch.as_tensor(rows) if isinstance(rows, np.ndarray) else rows]
        return self.tokens[idx]

    def dense(self) -> torch.Tensor:
        """The full (N, T, D) tensor (for small slides and tests)."""
        return self.tokens[self.index]


@dataclass
class SlideTensors:
    """Cached features and targets of one slide.

    Attributes
    ----------
    local
        Local-tile features, float32 (N, D).
    coords
        Spot centres in µm, float32 (N, 2).
    neighbour
        Neighbour-grid features, float32 (N, n_neighbours, D), a :class:`TokenGrid` standing for
        them (lattice tokens gathered per batch), or ``None``.
    expr
        Log-normalised expression, float32 (N, G), or ``None`` (prediction only).
    name
        Slide name (for logs).
    """

    local: torch.Tensor
    coords: torch.Tensor
    neighbour: torch.Tensor | TokenGrid | None = None
    expr: torch.Tensor | None = None
    name: str = "slide"

    def __post_init__(self) -> None:
        n = self.local.shape[0]
        if self.local.ndim != 2:
            raise ValueError(f"{self.name}: local features must be (N, D), got {tuple(self.local.shape)}.")
        if tuple(self.coords.shape) != (n, 2):
            raise ValueError(f"{self.name}: coords must be ({n}, 2), got {tuple(self.coords.shape)}.")
        if self.neighbour is not None and (self.neighbour.ndim != 3 or self.neighbour.shape[0] != n):
            raise ValueError(f"{self.name}: neighbour features must be ({n}, T, D), got {tuple(self.neighbour.shape)}.")
        if self.expr is not None:
            if self.expr.ndim != 2 or self.expr.shape[0] != n:
                raise ValueError(f"{self.name}: expression must be ({n}, G), got {tuple(self.expr.shape)}.")
            if not torch.isfinite(self.expr).all():
                raise ValueError(f"{self.name}: expression contains NaN or infinite values.")
        if not torch.isfinite(self.local).all():
            raise ValueError(f"{self.name}: local features contain NaN or infinite values.")

    @property
    def n_spots(self) -> int:
        """Number of spots N."""
        return self.local.shape[0]

    @classmethod
    def from_numpy(
        cls,
        local: np.ndarray,
        coords: np.ndarray,
        neighbour: np.ndarray | TokenGrid | None = None,
        expr: np.ndarray | None = None,
        name: str = "slide",
    ) -> SlideTensors:
        """Wrap numpy arrays (no copy where the dtype is already float32 and the array writable).

        Read-only arrays (e.g. memory-mapped feature caches) are copied into memory; a
        :class:`TokenGrid` is kept as it is.
        """

        @overload
        def t(a: np.ndarray) -> torch.Tensor: ...
        @overload
        def t(a: None) -> None: ...
        def t(a: np.ndarray | None) -> torch.Tensor | None:
            if a is None:
                return None
            a = np.ascontiguousarray(a, dtype=np.float32)
            return torch.from_numpy(a if a.flags.writeable else np.array(a))

        nb = neighbour if isinstance(neighbour, TokenGrid) else t(neighbour)
        return cls(t(local), t(coords), nb, t(expr), name)


class SpotBatches(Dataset):
    """Map-style dataset whose item ``i`` is one batch of spots: of one slide, or mixed across slides.

    By default batches stay within a slide, so a batch's contrastive negatives all come from the
    same slide. With ``mix_slides=True`` every batch draws its spots at random from all training
    slides, so in-batch negatives also come from other slides and patients (methods with slide-level
    context, such as Gene-DML's global branch, still attend within each spot's own slide).

    Each epoch (:meth:`set_epoch`) reshuffles the spots (per slide, or all together when mixing),
    splits them into near-equal batches of at most ``batch_size``, and shuffles the order of the
    batches, deterministically from ``seed`` and the epoch. Use with ``DataLoader(ds, batch_size=None)``;
    under DDP, Lightning's distributed sampler hands each process a disjoint share of the batches.

    Items are ``{"slide": LongTensor, "index": LongTensor (B,)}``: ``slide`` is a scalar for a
    one-slide batch and the slide of every spot, (B,), for a mixed one, whose spots are ordered by
    slide and then by index (so each slide's spots form one contiguous run).

    Parameters
    ----------
    n_spots
        Spots per training slide.
    batch_size
        Spots per batch, >= 2.
    seed
        Seed of the batch draws.
    mix_slides
        Draw every batch from all slides instead of from one.
    """

    def __init__(self, n_spots: Sequence[int], batch_size: int, seed: int = 0, mix_slides: bool = False) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (contrastive losses need pairs), got {batch_size}.")
        self.n_spots = [int(n) for n in n_spots]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mix_slides = bool(mix_slides)
        if self.mix_slides:
            total = sum(self.n_spots)
            self._n_batches = [max(1, -(-total // self.batch_size))] if total else []
        else:
            self._n_batches = [max(1, -(-n // self.batch_size)) for n in self.n_spots if n > 0]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of an epoch."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        plan: list[tuple[int | np.ndarray, np.ndarray]] = []
        if self.mix_slides:
            slide_of = np.repeat(np.arange(len(self.n_spots)), self.n_spots)
            row_of = np.concatenate([np.arange(n) for n in self.n_spots]) if self.n_spots else np.zeros(0, int)
            perm = rng.permutation(slide_of.size)
            for chunk in np.array_split(perm, self._n_batches[0]) if self._n_batches else []:
                order = np.lexsort((row_of[chunk], slide_of[chunk]))
                plan.append((slide_of[chunk][order], row_of[chunk][order]))
        else:
            for s, n in enumerate(self.n_spots):
                if n == 0:
                    continue
                perm = rng.permutation(n)
                plan.extend((s, np.sort(c)) for c in np.array_split(perm, max(1, -(-n // self.batch_size))))
        order = rng.permutation(len(plan))
        self._plan = [plan[i] for i in order]

    def __len__(self) -> int:
        return sum(self._n_batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        slide, idx = self._plan[i]
        return {
            "slide": torch.as_tensor(np.asarray(slide, dtype=np.int64)),
            "index": torch.from_numpy(idx.astype(np.int64)),
        }
