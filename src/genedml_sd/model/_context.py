"""Slide-level context of bounded size: the global branch attends over at most K spots of a slide.

The paper's global branch is self-attention over all N spots of a slide. Recomputed for every
training batch, that costs O(N^2) per batch and O(N^3 / B) per epoch: fine for 300 legacy-ST spots,
infeasible for 10^5 Visium HD bins. With ``context_size=K`` a slide of more than K spots is seen
through K of them:

* training: the batch's spots plus ``K - B`` other spots of the slide drawn at random for every
  step form the set the global blocks attend over (exact self-attention within that set), so a
  step costs O(K^2) and an epoch O(N K);
* prediction: a fixed set of K spots (a seeded random sample) is passed through the global blocks
  once; every other spot attends, layer by layer, to those K context tokens and to itself, in
  query chunks, so a slide costs O(N K) time and O(K) memory beyond the batch.

Slides of at most K spots get the paper's exact attention over all of them, in training and in
prediction. Only torch is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from ._modules import Block, GeneDML

CONTEXT_SEED = 0
"""Seed of the fixed prediction-time context sample."""


def sample_context_rows(rows: torch.Tensor, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch rows followed by ``k - len(rows)`` other distinct rows of ``range(n)`` drawn at random.

    Parameters
    ----------
    rows
        Distinct batch rows, int64 (B,) on the CPU.
    n
        Spots in the slide.
    k
        Context size; when ``k <= B`` the context is the batch itself.
    generator
        Random generator (default: torch's global one, seeded by the training plan).

    Returns
    -------
    int64 (max(k, B),) on the CPU; the first B entries are ``rows``.
    """
    rows = rows.to("cpu", torch.int64)
    need = min(k, n) - rows.numel()
    if need <= 0:
        return rows
    cand = torch.randint(0, n, (2 * need + 16,), generator=generator).unique()
    cand = cand[~torch.isin(cand, rows)]
    if cand.numel() < need:  # small slides: draw from the complement exactly
        free = torch.ones(n, dtype=torch.bool)
        free[rows] = False
        cand = free.nonzero().squeeze(1)
    cand = cand[torch.randperm(cand.numel(), generator=generator)[:need]]
    return torch.cat([rows, cand])


def fixed_context_rows(n: int, k: int) -> torch.Tensor:
    """The prediction-time context: ``min(k, n)`` rows of ``range(n)``, a seeded random sample, sorted, int64."""
    g = torch.Generator().manual_seed(CONTEXT_SEED)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


class SlideContext:
    """Global-branch tokens of a slide, computed in row chunks against a fixed context of K spots.

    Indexing with a slice of rows (``ctx[s:e]``) returns the (e - s, dim) global tokens of those spots,
    on the module's device; the K context tokens of every global block are computed once, when the
    object is made. Rows that belong to the context get exactly their token from the self-attention
    over the context; the others attend to the context and to themselves (see the module docstring).

    Parameters
    ----------
    module
        The Gene-DML module (in eval mode for prediction).
    local_all
        Local features of all N spots (N, D), on any device (rows are moved as needed).
    coords_um
        Their centres in µm (N, 2).
    rows
        The context rows, int64 (K,) (e.g. :func:`~genedml_sd.model.fixed_context_rows`).
    """

    def __init__(self, module: GeneDML, local_all: torch.Tensor, coords_um: torch.Tensor, rows: torch.Tensor) -> None:
        self.module = module
        self.local_all, self.coords_um = local_all, coords_um
        self.n = int(local_all.shape[0])
        dev = module.device
        self.centre = coords_um.float().mean(0).to(dev)
        self.in_context = torch.zeros(self.n, dtype=torch.bool)
        self.in_context[rows] = True
        x = module.global_embedding(local_all[rows].to(dev), coords_um[rows].to(dev), self.centre)
        self.layers: list[torch.Tensor] = []  # input tokens (K, dim) of every global block
        for blk in module.global_blocks:
            self.layers.append(x)
            x = blk(x.unsqueeze(0), chunk=module.config.attn_chunk)[0]

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, dim)``."""
        return (self.n, int(self.module.config.dim))

    def __getitem__(self, index: slice) -> torch.Tensor:
        m = self.module
        rows = torch.arange(self.n)[index]
        dev = m.device
        x = m.global_embedding(self.local_all[rows].to(dev), self.coords_um[rows].to(dev), self.centre)
        add_self = (~self.in_context[rows]).to(dev)
        for blk, ctx in zip(m.global_blocks, self.layers, strict=True):
            x = cast("Block", blk).forward_context(x, ctx, add_self)
        return m.global_proj(m.global_norm(x))
