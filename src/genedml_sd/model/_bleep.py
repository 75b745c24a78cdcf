"""BLEEP baseline (``method="bleep"``): contrastive image / expression embeddings, prediction by retrieval.

:class:`BLEEPConfig`, :class:`ProjectionHead`, :class:`~genedml_sd.model.BLEEP`. Pure torch; trained by the shared plan
(the reference bank is rebuilt before every validation and once after training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genedml_sd._docs import docs

from ._base import (
    LossOutput,
    SlideModule,
    SpotBatch,
    TrainedConfig,
    check_local_only,
    feature_stats_float64,
    targets,
)
from ._data import SlideTensors
from ._losses import soft_target_instance_loss
from ._retrieval import topk_mean_expression


@docs
@dataclass(frozen=True)
class BLEEPConfig(TrainedConfig):
    """Hyper-parameters of :class:`~genedml_sd.model.BLEEP` and its training.

    Attributes
    ----------
    %(config_dims)s
    dim
        Width of the image and expression embeddings (256 in BLEEP).
    dropout
        Dropout in the projection heads.
    tau
        Fixed temperature of the soft-target contrastive loss on L2-normalised embeddings, and of the
        ``"weighted"`` aggregation. BLEEP uses temperature 1 on *un-normalised* LayerNorm outputs
        (norm about ``sqrt(dim)``), which is a much sharper softmax than temperature 1 on cosine
        similarities; 0.07 (CLIP's, and Gene-DML's initial value) is used instead.
    top_k
        Number of retrieved training spots per query (50 in BLEEP).
    aggregate
        ``"mean"``: plain mean expression of the ``top_k`` retrieved spots (BLEEP's default);
        ``"weighted"``: weights ``softmax(cos / tau)`` over the retrieved spots.
    n_reference
        Size of the reference bank (all training spots); set for training by :meth:`for_training`.
    lr, weight_decay
        AdamW learning rate and weight decay (BLEEP: 1e-3, 1e-3).
    step_size, gamma, lr_interval
        StepLR schedule: the rate is multiplied by ``gamma`` every ``step_size`` units of ``lr_interval``
        (``"epoch"``, as the paper states, or ``"step"``: optimiser steps); ``gamma=1`` keeps the rate constant, as in BLEEP.
    use_local, use_neighbour, use_global
        Scale switches, fixed to local only.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-3
    gamma: float = 1.0
    dim: int = 256
    dropout: float = 0.1
    tau: float = 0.07
    top_k: int = 50
    aggregate: str = "mean"
    n_reference: int = 0
    use_local: bool = True
    use_neighbour: bool = False
    use_global: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_local_only(self)
        for name in ("dim", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_reference < 0:
            raise ValueError(f"n_reference must be >= 0, got {self.n_reference}.")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")
        if self.aggregate not in ("mean", "weighted"):
            raise ValueError(f"aggregate must be 'mean' or 'weighted', got {self.aggregate!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    def for_training(self, train: Sequence[SlideTensors]) -> BLEEPConfig:
        """A copy with ``n_reference`` = the number of training spots (the reference bank)."""
        return self.replace(n_reference=sum(s.n_spots for s in train))


class ProjectionHead(nn.Module):
    """BLEEP / CLIP projection head: ``p = Linear(in, dim)(x)``; ``LayerNorm(p + Dropout(Linear(GELU(p))))``.

    Parameters
    ----------
    in_dim
        Input width.
    dim
        Embedding width.
    dropout
        Dropout on the residual branch.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed (B, in_dim) -> (B, dim)."""
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(F.gelu(p))))


class BLEEP(SlideModule):
    """BLEEP: contrastive image / expression embeddings and prediction by retrieval.

    * image head: standardised local features (B, D) -> :class:`ProjectionHead` -> (B, dim);
    * expression head: log-normalised expression (B, G) -> :class:`ProjectionHead` -> (B, dim);
    * training: :func:`~genedml_sd.model.soft_target_instance_loss` between the two (fixed ``tau``);
    * prediction: the query spot's image embedding is compared (cosine similarity) with the
      *expression* embeddings of all training spots (the reference bank), and the prediction is the
      mean (or ``softmax(cos / tau)``-weighted mean) expression of the ``top_k`` most similar ones.

    The reference bank is two buffers sized by ``config.n_reference``: ``ref_embedding``
    (n_reference, dim), L2-normalised expression embeddings, and ``ref_expr`` (n_reference, G), the
    training expression; so a module rebuilt from its config predicts alone after ``load_state_dict``.
    Queries are processed in chunks (``predict_slide``'s ``batch_size``), so at most
    ``batch_size x n_reference`` similarities exist at once.
    """

    optimizer_cls = torch.optim.AdamW
    config: BLEEPConfig
    ref_embedding: torch.Tensor  # buffers, registered in __init__
    ref_expr: torch.Tensor

    def __init__(self, config: BLEEPConfig) -> None:
        super().__init__(config)
        self.image_head = ProjectionHead(config.enc_dim, config.dim, config.dropout)
        self.gene_head = ProjectionHead(config.n_genes, config.dim, config.dropout)
        self.register_buffer("ref_embedding", torch.zeros(config.n_reference, config.dim))
        self.register_buffer("ref_expr", torch.zeros(config.n_reference, config.n_genes))

    def embed_image(self, local: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, dim) of local features (B, D) (not normalised)."""
        return self.image_head(self.standardise(local))

    def embed_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression embeddings (B, dim) of log-normalised expression (B, G) (not normalised)."""
        return self.gene_head(expr.float())

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        """Soft-target contrastive loss of a batch (part ``instance``)."""
        cfg = self.config
        loss = soft_target_instance_loss(self.embed_image(batch.local), self.embed_expression(batch.expr), cfg.tau)
        return LossOutput(loss, {"instance": loss})

    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Feature statistics (float64) and the reference expression (all training spots, in slide order)."""
        mean, std = feature_stats_float64(train)
        self.set_feature_stats(mean, std)
        expr = torch.cat([targets(s) for s in train]).float()
        if expr.shape[0] != self.config.n_reference:
            raise ValueError(f"{expr.shape[0]} training spots, but config.n_reference={self.config.n_reference}.")
        self.ref_expr.copy_(expr)

    @torch.no_grad()
    def build_reference(self, batch_size: int = 4096) -> None:
        """Recompute ``ref_embedding`` from ``ref_expr`` with the current expression head (eval mode)."""
        was_training = self.training
        self.eval()
        dev = self.ref_expr.device
        try:
            with torch.autocast(device_type=dev.type, enabled=False):
                for s in range(0, self.config.n_reference, batch_size):
                    emb = self.embed_expression(self.ref_expr[s : s + batch_size])
                    self.ref_embedding[s : s + batch_size] = F.normalize(emb.float(), dim=1)
        finally:
            self.train(was_training)

    def set_reference(self, embedding: torch.Tensor, expr: torch.Tensor) -> None:
        """Set the reference bank by hand: embeddings (n_reference, dim) (normalised here), expression (n_reference, G)."""
        self.ref_embedding.copy_(F.normalize(torch.as_tensor(embedding, dtype=torch.float32), dim=1))
        self.ref_expr.copy_(torch.as_tensor(expr, dtype=torch.float32))

    def retrieve(self, query: torch.Tensor) -> torch.Tensor:
        """Predict expression (B, G) from query image embeddings (B, dim) by top-k retrieval."""
        cfg = self.config
        if cfg.n_reference == 0:
            raise RuntimeError("BLEEP has an empty reference bank (n_reference=0); train it first.")
        with torch.autocast(device_type=query.device.type, enabled=False):
            sims = F.normalize(query.float(), dim=1) @ self.ref_embedding.T
        return topk_mean_expression(sims, self.ref_expr, cfg.top_k, None if cfg.aggregate == "mean" else cfg.tau)

    def on_validation_start(self) -> None:
        """Rebuild the reference bank with the current weights before each validation."""
        self.build_reference()

    def on_fit_end(self) -> None:
        """Rebuild the reference bank with the final (best) weights."""
        self.build_reference()

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Predict log-normalised expression (B, G) from local features (B, D) by retrieval."""
        return self.retrieve(self.embed_image(local))

    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted expression (B, G) of B query spots from their local features (B, D)."""
        return self(local)
