"""NH2ST (``method="nh2st"``): query / neighbour hypergraph cross-attention model (pure torch).

The second seed system of the project (see ``METHOD.md``), implemented from its description on the
same cached frozen-encoder features as Gene-DML:

* **query branch**: the target spot's local feature -> image embedding; its measured expression ->
  gene embedding (two linear layers);
* **neighbour branch**: the spots of the 5x5 lattice neighbourhood of the target (their local
  features and, during training, their measured expression) are the nodes of a hypergraph whose
  hyperedges join each node to its ``top_k`` most similar nodes; one hypergraph-convolution
  encoder for the image nodes, one for the gene nodes;
* cross-attention between image and gene embeddings at both levels, then a contrastive loss per
  level (cosine / 0.05, negatives down-weighted by 0.1);
* a decoder (MLP) on the target's image embedding predicts the G genes; prediction needs only the
  image, neighbour expression is a training signal only.

The hypergraph pieces live in :mod:`._hypergraph`, the spot neighbourhoods in :mod:`._neighbourhood`
(re-exported here). This module imports only torch and numpy; training goes through the shared plan
(:func:`~genedml_sd.model.train_method` with ``"nh2st"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from genedml_sd._docs import docs

from ._base import LossOutput, SlideModule, SpotBatch, TrainedConfig, targets
from ._data import SlideTensors
from ._hypergraph import (
    CrossAttention,
    HypergraphConv,
    HypergraphEncoder,
    hypergraph_incidence,
    hypergraph_propagation,
    weighted_contrastive_loss,
)
from ._neighbourhood import estimate_pitch, spot_neighbourhood

__all__ = [
    "NH2ST",
    "CrossAttention",
    "HypergraphConv",
    "HypergraphEncoder",
    "NH2STConfig",
    "estimate_pitch",
    "hypergraph_incidence",
    "hypergraph_propagation",
    "spot_neighbourhood",
    "weighted_contrastive_loss",
]


# ====================================================================================== config
@docs
@dataclass(frozen=True)
class NH2STConfig(TrainedConfig):
    """Hyper-parameters of :class:`~genedml_sd.model.NH2ST` and its training.

    Attributes
    ----------
    %(config_dims)s
    dim
        Width of all embeddings (512 in the paper).
    radius
        Radius r of the spot neighbourhood in lattice steps (2: the 5x5 neighbourhood, 25 nodes).
    top_k
        Each node's hyperedge joins it to its ``top_k`` most similar valid nodes (cosine).
    hg_layers
        Hypergraph-convolution layers of each (image, gene) node encoder.
    n_heads
        Heads of the cross-attention.
    dropout
        Dropout in the hypergraph encoders, cross-attention MLPs and decoder.
    tau
        Temperature of the contrastive losses (fixed).
    neg_weight
        Weight of the negatives in the contrastive softmax denominator.
    query_weight, neighbour_weight, mse_weight
        Weights of the query contrastive loss, neighbour contrastive loss and decoder MSE.
    lr, weight_decay
        Adam learning rate and weight decay.
    step_size, gamma, lr_interval
        StepLR schedule: the rate is multiplied by ``gamma`` every ``step_size`` units of ``lr_interval``
        (``"epoch"``, as the paper states, or ``"step"``: optimiser steps).
    pitch_um
        Lattice pitch of the spots in µm; ``None`` estimates it per slide.
    use_local, use_neighbour, use_global
        Class constants (not fields, inherited from :class:`~genedml_sd.model.MethodConfig`): NH2ST reads
        only local-tile features; the package asks configs whether to extract 5x5 grid-tile features,
        which NH2ST does not need.
    """

    method: ClassVar[str] = "nh2st"

    dim: int = 512
    radius: int = 2
    top_k: int = 3
    hg_layers: int = 2
    n_heads: int = 8
    dropout: float = 0.1
    tau: float = 0.05
    neg_weight: float = 0.1
    query_weight: float = 1.0
    neighbour_weight: float = 0.5
    mse_weight: float = 1.0
    pitch_um: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dim", "n_heads", "hg_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("radius", "top_k", "query_weight", "neighbour_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}.")
        for name in ("tau", "neg_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not self.mse_weight > 0:
            raise ValueError("mse_weight must be > 0: the decoder is what predicts expression.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.pitch_um is not None and not self.pitch_um > 0:
            raise ValueError(f"pitch_um must be > 0 or None, got {self.pitch_um}.")

    @property
    def n_nodes(self) -> int:
        """Nodes of a neighbourhood, ``(2 radius + 1)^2``."""
        return (2 * self.radius + 1) ** 2


# ======================================================================================== model
class NH2ST(SlideModule):
    """NH2ST on cached local-tile features: query + neighbour hypergraph branches, image decoder.

    * Image embedding ``Linear(D, dim)`` of standardised local features (shared by the target and
      the neighbourhood nodes); gene embedding ``Linear(G, dim) -> GELU -> Linear(dim, dim)`` of
      log-normalised expression (shared likewise; training only).
    * Query level: one image token and one gene token per spot; ``CrossAttention`` image ->
      gene and gene -> image (with a single key the attention weight is 1, so this level reduces to a
      learned cross-modal value mapping + MLP); contrastive loss between the two outputs.
    * Neighbour level: the ``(2r+1)^2`` slots of ``spot_neighbourhood`` (centre = target) are the
      nodes; ``HypergraphEncoder`` for image nodes and for gene nodes; image nodes attend to the
      gene nodes and gene nodes to the image nodes (missing nodes masked as keys); each output is
      mean-pooled over the valid nodes; contrastive loss between the two pooled vectors.
    * Decoder ``Linear(dim, dim) -> GELU -> Dropout -> Linear(dim, G)`` on the target's image
      embedding (before cross-attention), trained with MSE; it alone makes predictions.

    Total loss: ``query_weight * L_query + neighbour_weight * L_neighbour + mse_weight * MSE``.

    Frozen-encoder features are standardised with per-dimension training statistics stored as
    buffers (:meth:`~genedml_sd.model.SlideModule.set_feature_stats`), so they travel with the weights.
    During training, each training slide's spot neighbourhood (``spot_neighbourhood``, radius and
    pitch from the config) is computed once (:meth:`slide_context`).
    """

    config: NH2STConfig

    def __init__(self, config: NH2STConfig) -> None:
        super().__init__(config)
        cfg = config
        d = cfg.dim
        self.image_proj = nn.Linear(cfg.enc_dim, d)
        self.gene_encoder = nn.Sequential(nn.Linear(cfg.n_genes, d), nn.GELU(), nn.Linear(d, d))
        self.image_hypergraph = HypergraphEncoder(d, cfg.hg_layers, cfg.top_k, cfg.dropout)
        self.gene_hypergraph = HypergraphEncoder(d, cfg.hg_layers, cfg.top_k, cfg.dropout)
        self.query_image_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.query_gene_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.node_image_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.node_gene_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, cfg.n_genes))

    # ------------------------------------------------------------------------------ set-up
    @property
    def output_bias(self) -> torch.Tensor:
        """Bias (G,) of the decoder's last layer."""
        return cast(nn.Linear, self.decoder[-1]).bias

    # ------------------------------------------------------------------------------ embeddings
    def image_embedding(self, local: torch.Tensor) -> torch.Tensor:
        """Image embedding (..., dim) of local features (..., D)."""
        return self.image_proj(self.standardise(local))

    def gene_embedding(self, expr: torch.Tensor) -> torch.Tensor:
        """Gene embedding (..., dim) of log-normalised expression (..., G)."""
        return self.gene_encoder(expr.float())

    def forward(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict expression of B spots from their local features (B, D).

        Returns
        -------
        ``{"pred": (B, G) log-normalised expression, "image": (B, dim) image embedding}``.
        """
        image = self.image_embedding(local)
        return {"pred": self.decoder(image), "image": image}

    def query_level(self, image: torch.Tensor, gene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attended query-level pair from the target's image and gene embeddings (B, dim).

        Returns
        -------
        ``(image -> gene, gene -> image)`` outputs, each (B, dim).
        """
        i, g = image[:, None], gene[:, None]
        return self.query_image_attn(i, g)[:, 0], self.query_gene_attn(g, i)[:, 0]

    def neighbour_level(
        self, node_local: torch.Tensor, node_expr: torch.Tensor, node_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour-level pair of each target spot from its neighbourhood nodes.

        Parameters
        ----------
        node_local
            Local features of the neighbourhood slots (B, T, D); missing slots may hold anything finite.
        node_expr
            Expression of the neighbourhood slots (B, T, G).
        node_mask
            Valid slots, bool (B, T); every row needs at least one (the centre, the target itself).

        Returns
        -------
        ``(image -> gene, gene -> image)`` outputs, mean-pooled over valid nodes, each (B, dim).
        """
        mask = node_mask.bool()
        image = self.image_hypergraph(self.image_embedding(node_local), mask)
        gene = self.gene_hypergraph(self.gene_embedding(node_expr), mask)
        zi = self.node_image_attn(image, gene, mask)
        zg = self.node_gene_attn(gene, image, mask)
        w = mask[..., None].to(zi.dtype)
        denom = w.sum(dim=1).clamp_min(1)
        return (zi * w).sum(dim=1) / denom, (zg * w).sum(dim=1) / denom

    # ------------------------------------------------------------------------------ training
    def loss(
        self,
        local: torch.Tensor,
        expr: torch.Tensor,
        node_local: torch.Tensor | None = None,
        node_expr: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Total loss and its parts for a batch of B target spots.

        Parameters
        ----------
        local
            Target local features (B, D).
        expr
            Target log-normalised expression (B, G).
        node_local, node_expr, node_mask
            Neighbourhood slots (B, T, D), (B, T, G), bool (B, T) (see :meth:`neighbour_level`);
            needed when ``neighbour_weight > 0``.

        Returns
        -------
        :class:`~genedml_sd.model.LossOutput` of scalars ``total`` and parts ``query``, ``neighbour``,
        ``mse`` (a part with weight 0 is 0).
        """
        cfg = self.config
        out = self(local)
        zero = out["pred"].new_zeros((), dtype=torch.float32)
        query = neighbour = zero
        if cfg.query_weight > 0:
            zi, zg = self.query_level(out["image"], self.gene_embedding(expr))
            query = weighted_contrastive_loss(zi, zg, cfg.tau, cfg.neg_weight)
        if cfg.neighbour_weight > 0:
            if node_local is None or node_expr is None or node_mask is None:
                raise ValueError("neighbour_weight > 0 needs node_local, node_expr and node_mask.")
            zi, zg = self.neighbour_level(node_local, node_expr, node_mask)
            neighbour = weighted_contrastive_loss(zi, zg, cfg.tau, cfg.neg_weight)
        mse = F.mse_loss(out["pred"].float(), expr.float())
        total = cfg.query_weight * query + cfg.neighbour_weight * neighbour + cfg.mse_weight * mse
        return LossOutput(total, {"query": query, "neighbour": neighbour, "mse": mse})

    def slide_context(self, slide: SlideTensors) -> torch.Tensor:
        """The slide's spot neighbourhood, LongTensor (N, (2r+1)^2) of spot indices, -1 where empty."""
        return spot_neighbourhood(slide.coords, self.config.pitch_um, self.config.radius)

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        """Loss of a batch: the targets and their neighbourhood slots (missing slots hold spot 0's values, masked)."""
        if self.config.neighbour_weight <= 0:
            return self.loss(batch.local, batch.expr)
        dev = batch.local.device
        masks, locals_, exprs = [], [], []
        for part in batch.parts:  # one part per slide in the batch
            nodes = part.context[part.index]
            safe = nodes.clamp_min(0)
            masks.append(nodes >= 0)
            locals_.append(part.slide.local[safe])
            exprs.append(targets(part.slide)[safe])
        node_local = torch.cat(locals_).to(dev, non_blocking=True)
        node_expr = torch.cat(exprs).to(dev, non_blocking=True)
        return self.loss(batch.local, batch.expr, node_local, node_expr, torch.cat(masks).to(dev, non_blocking=True))

    # ------------------------------------------------------------------------------ inference
    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted expression (B, G) from local features (B, D) alone (neighbour inputs are ignored)."""
        return self(local)["pred"]
