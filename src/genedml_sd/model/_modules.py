"""The trainable Gene-DML network (pure torch; knows only tensors)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ._base import LossOutput, SlideModule, SpotBatch, targets
from ._config import GeneDMLConfig
from ._context import SlideContext, fixed_context_rows, sample_context_rows
from ._data import SlideTensors
from ._losses import instance_group_loss, multiscale_instance_loss, prediction_loss
from ._retrieval import choose_predictor, reference_rows, topk_mean_expression


class Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + MLP) on (B, T, C) tokens.

    Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (flash /
    memory-efficient kernels where available). With ``chunk``, queries are processed in chunks of
    that many tokens, so at most ``chunk x T`` attention scores per head exist at once: this is what
    lets the slide-level block attend over 10^5 spots.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Self-attention of (B, T, C) tokens -> (B, T, C)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        if chunk is None or t <= chunk:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat(
                [F.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v) for s in range(0, t, chunk)], dim=2
            )
        return self.proj(out.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Apply the block to (B, T, C) tokens."""
        x = x + self.drop(self.attention(self.norm1(x), chunk))
        return x + self.drop(self.mlp(self.norm2(x)))

    def context_attention(self, x: torch.Tensor, context: torch.Tensor, add_self: torch.Tensor) -> torch.Tensor:
        """Attention of Q query tokens over K context tokens and, where ``add_self``, the query itself.

        Parameters
        ----------
        x
            Normalised query tokens (Q, C).
        context
            Normalised context tokens (K, C).
        add_self
            Bool (Q,): also attend to the query's own key (for queries that are not among the context).

        Returns
        -------
        (Q, C), as one row of :meth:`attention` over the set ``context`` (plus the query) would be.
        """
        q_n, c = x.shape
        h, dh = self.n_heads, c // self.n_heads
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(x, wq, bq).view(q_n, h, dh)
        k_self = F.linear(x, wk, bk).view(q_n, h, dh)
        v_self = F.linear(x, wv, bv).view(q_n, h, dh)
        k = F.linear(context, wk, bk).view(-1, h, dh)
        v = F.linear(context, wv, bv).view(-1, h, dh)
        scale = dh**-0.5
        scores = torch.einsum("qhd,khd->qhk", q, k) * scale
        own = ((q * k_self).sum(-1, keepdim=True) * scale).masked_fill(~add_self.view(-1, 1, 1), float("-inf"))
        p = torch.cat([scores, own], dim=-1).softmax(dim=-1)
        out = torch.einsum("qhk,khd->qhd", p[..., :-1], v) + p[..., -1:] * v_self
        return self.proj(out.reshape(q_n, c))

    def forward_context(self, x: torch.Tensor, context: torch.Tensor, add_self: torch.Tensor) -> torch.Tensor:
        """The block applied to query tokens (Q, C) attending over context tokens (K, C) (see :meth:`context_attention`)."""
        x = x + self.drop(self.context_attention(self.norm1(x), self.norm1(context), add_self))
        return x + self.drop(self.mlp(self.norm2(x)))


def sinusoidal_position_encoding(
    coords_um: torch.Tensor, dim: int, min_um: float, max_um: float, centre_um: torch.Tensor | None = None
) -> torch.Tensor:
    """2-D sinusoidal encoding of spot positions in µm.

    Coordinates are centred on the slide's mean position (so a translated slide encodes the same).
    ``dim / 4`` wavelengths spaced geometrically from ``min_um`` to ``max_um`` are used for each axis,
    each giving a sine and a cosine.

    Parameters
    ----------
    coords_um
        Spot centres ``(x, y)`` in µm, (N, 2).
    dim
        Output width (divisible by 4).
    min_um, max_um
        Shortest and longest wavelength, µm.
    centre_um
        The slide's mean position (2,), when ``coords_um`` holds only some of its spots (default: their mean).

    Returns
    -------
    (N, dim) float32 encoding.
    """
    n_freq = dim // 4
    wavelengths = torch.logspace(math.log10(min_um), math.log10(max_um), n_freq, device=coords_um.device)
    omega = 2 * math.pi / wavelengths
    centre = coords_um.float().mean(dim=0, keepdim=True) if centre_um is None else centre_um.float().view(1, 2)
    c = coords_um.float() - centre
    ax = c[:, :1] * omega
    ay = c[:, 1:2] * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)


class GeneDML(SlideModule):
    """Gene-DML: multi-scale image embeddings, a gene encoder and a prediction head.

    Scales (each switchable in the config):

    * local: the spot's own tile feature ``(B, D)`` -> ``Linear(D, dim)``;
    * neighbour: the 5x5 grid of tile features ``(B, 25, D)`` -> ``Linear(D, dim)`` + learned
      position embedding -> self-attention blocks -> mean pool -> ``Linear(dim, dim)``;
    * global: the local features of *all* spots of the slide ``(N, D)`` -> ``Linear(D, dim)`` + 2-D
      sinusoidal µm position encoding -> transformer block(s) over the N spots -> ``Linear(dim, dim)``;
      on slides of more than ``config.context_size`` spots, over a bounded context of that many spots
      (see :class:`~genedml_sd.model.SlideContext`).

    The scale vectors form a sequence of up to 3 tokens, mixed by self-attention (scale-wise fusion);
    the fused tokens are concatenated and mapped to the G genes by the prediction head. During
    training, a gene encoder embeds the measured expression for the contrastive losses.

    Frozen-encoder features are standardised with per-dimension training statistics stored as
    buffers (:meth:`~genedml_sd.model.SlideModule.set_feature_stats`), so they travel with the weights.

    With ``config.predictor`` ``"retrieval"`` or ``"blend"``, prediction also (or only) retrieves from the
    gene-aligned space (:meth:`retrieve`): a bank of training spots' expression (``ref_expr``) and gene
    embeddings (``ref_embedding``, rebuilt before every validation and after training) is kept as
    buffers sized by ``config.n_reference``, so a module rebuilt from its config predicts alone.
    """

    config: GeneDMLConfig
    ref_expr: torch.Tensor  # retrieval bank buffers (n_reference, G) / (n_reference, dim), with a retrieval predictor
    ref_embedding: torch.Tensor

    def __init__(self, config: GeneDMLConfig) -> None:
        super().__init__(config)
        cfg = config
        d, enc = cfg.dim, cfg.enc_dim

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList([Block(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(n)])

        if cfg.use_local:
            self.local_proj = nn.Linear(enc, d)
        if cfg.use_neighbour:
            self.neighbour_in = nn.Linear(enc, d)
            self.neighbour_pos = nn.Parameter(torch.zeros(1, cfg.n_neighbours, d))
            nn.init.trunc_normal_(self.neighbour_pos, std=0.02)
            self.neighbour_blocks = blocks(cfg.neighbour_depth)
            self.neighbour_norm = nn.LayerNorm(d)
            self.neighbour_proj = nn.Linear(d, d)
        if cfg.use_global:
            self.global_in = nn.Linear(enc, d)
            self.global_blocks = blocks(cfg.global_depth)
            self.global_norm = nn.LayerNorm(d)
            self.global_proj = nn.Linear(d, d)
        n_scales = len(cfg.scales)
        self.scale_embed = nn.Parameter(torch.zeros(1, n_scales, d))
        nn.init.trunc_normal_(self.scale_embed, std=0.02)
        self.fusion_blocks = blocks(cfg.fusion_depth)
        self.fusion_norm = nn.LayerNorm(d)

        # training-only parts exist only when a loss uses them (DDP needs every parameter to get a gradient)
        h = cfg.gene_hidden
        if cfg.instance_loss or cfg.group_loss:
            self.gene_encoder = nn.Sequential(
                nn.Linear(cfg.n_genes, h),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(h, h),
                # FFN
                nn.Linear(h, h),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(h, d),
            )
        if cfg.group_loss:
            self.image_group = nn.Linear(d, cfg.group_dim)
            self.gene_group = nn.Linear(d, cfg.group_dim)
        if cfg.instance_loss:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.tau_init)), requires_grad=cfg.learn_tau)
        self.head = nn.Sequential(
            nn.LayerNorm(n_scales * d), nn.Dropout(cfg.dropout), nn.Linear(n_scales * d, cfg.n_genes)
        )
        if cfg.retrieves or cfg.n_reference:  # retrieval bank (kept if "auto" chose the head): expression, embeddings
            self.register_buffer("ref_expr", torch.zeros(cfg.n_reference, cfg.n_genes))
            self.register_buffer("ref_embedding", torch.zeros(cfg.n_reference, d))

    # ------------------------------------------------------------------------------ set-up
    @property
    def output_bias(self) -> torch.Tensor:
        """Bias (G,) of the prediction head."""
        return cast(nn.Linear, self.head[-1]).bias

    @property
    def tau(self) -> torch.Tensor:
        """Temperature of the instance loss, ``1 / exp(logit_scale)`` clamped to [0.01, 1]."""
        return (1 / self.logit_scale.exp()).clamp(0.01, 1.0)

    # ------------------------------------------------------------------------------ image pathway
    def global_embedding(
        self, local: torch.Tensor, coords_um: torch.Tensor, centre_um: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Input tokens of the global blocks: projected features plus µm position encoding, (n, D) -> (n, dim).

        ``centre_um`` is the slide's mean position (2,) when ``coords_um`` are only some of its spots.
        """
        cfg = self.config
        x = self.global_in(self.standardise(local))
        return x + sinusoidal_position_encoding(coords_um, cfg.dim, cfg.pos_min_um, cfg.pos_max_um, centre_um).to(
            x.dtype
        )

    def encode_global(self, local_all: torch.Tensor, coords_um: torch.Tensor) -> torch.Tensor:
        """Slide-level tokens of every spot, by exact self-attention over all N spots (the paper's).

        Parameters
        ----------
        local_all
            Local features of all N spots of one slide, (N, D).
        coords_um
            Their centres in µm, (N, 2).

        Returns
        -------
        (N, dim) global-scale vectors (before fusion).
        """
        cfg = self.config
        if not cfg.use_global:
            raise RuntimeError("This model has no global branch (use_global=False).")
        x = self.global_embedding(local_all, coords_um).unsqueeze(0)
        for blk in self.global_blocks:
            x = blk(x, chunk=cfg.attn_chunk)
        return self.global_proj(self.global_norm(x[0]))

    def global_rows(
        self,
        local_all: torch.Tensor,
        coords_um: torch.Tensor,
        rows: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training-time global tokens (B, dim) of the spots ``rows`` (B,) of a slide of N spots.

        Exact attention over all N spots when ``config.context_size`` is ``None`` or ``N <=
        context_size``; otherwise attention over the batch plus ``context_size - B`` other spots drawn
        at random (see :func:`~genedml_sd.model.sample_context_rows`), so the cost does not grow with N.
        """
        cfg = self.config
        dev = self.device
        n = int(local_all.shape[0])
        if cfg.context_size is None or n <= cfg.context_size:
            return self.encode_global(local_all.to(dev), coords_um.to(dev))[rows.to(dev)]
        ctx = sample_context_rows(rows, n, cfg.context_size, generator)
        centre = coords_um.float().mean(0).to(dev)
        x = self.global_embedding(local_all[ctx].to(dev), coords_um[ctx].to(dev), centre).unsqueeze(0)
        for blk in self.global_blocks:
            x = blk(x, chunk=cfg.attn_chunk)
        return self.global_proj(self.global_norm(x[0, : rows.numel()]))

    def encode_neighbour(self, neighbour: torch.Tensor) -> torch.Tensor:
        """Neighbour-scale vectors from the grid tokens (B, n_neighbours, D) -> (B, dim).

        In eval mode, identical token grids are encoded once: in the dense feature mode every
        observation of a lattice tile has the same 5 x 5 grid (about 200 bins of 8 µm share one), so
        prediction costs one neighbour transformer per tile in the batch, not per observation.
        """
        if not self.training and neighbour.shape[0] > 1:
            uniq, inverse = torch.unique(neighbour.flatten(1), dim=0, return_inverse=True)
            if uniq.shape[0] <= neighbour.shape[0] // 2:
                return self._encode_neighbour(uniq.view(-1, *neighbour.shape[1:]))[inverse]
        return self._encode_neighbour(neighbour)

    def _encode_neighbour(self, neighbour: torch.Tensor) -> torch.Tensor:
        x = self.neighbour_in(self.standardise(neighbour)) + self.neighbour_pos
        for blk in self.neighbour_blocks:
            x = blk(x)
        return self.neighbour_proj(self.neighbour_norm(x).mean(dim=1))

    def image_tokens(
        self,
        local: torch.Tensor | None,
        neighbour: torch.Tensor | None = None,
        global_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused scale tokens (B, S, dim), S = number of scales in use (order: local, neighbour, global).

        Parameters
        ----------
        local
            Local-tile features (B, D).
        neighbour
            Neighbour-grid features (B, n_neighbours, D), if the model uses that scale.
        global_tokens
            Rows of :meth:`encode_global` for these spots (B, dim), if the model uses that scale.
        """
        cfg = self.config
        toks = []
        if cfg.use_local:
            assert local is not None, "this model uses the local scale: pass local features (B, D)"
            toks.append(self.local_proj(self.standardise(local)))
        if cfg.use_neighbour:
            if neighbour is None:
                raise ValueError("This model uses the neighbour scale: pass neighbour features (B, 25, D).")
            toks.append(self.encode_neighbour(neighbour))
        if cfg.use_global:
            if global_tokens is None:
                raise ValueError("This model uses the global scale: pass global_tokens from encode_global().")
            toks.append(global_tokens)
        x = torch.stack(toks, dim=1) + self.scale_embed
        for blk in self.fusion_blocks:
            x = blk(x)
        return self.fusion_norm(x)

    def forward(
        self,
        local: torch.Tensor | None,
        neighbour: torch.Tensor | None = None,
        global_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict expression of B spots.

        Returns
        -------
        ``{"pred": (B, G) log-normalised expression, "tokens": (B, S, dim) fused scale tokens}``.
        """
        tokens = self.image_tokens(local, neighbour, global_tokens)
        return {"pred": self.head(tokens.flatten(1)), "tokens": tokens}

    def gene_embedding(self, expr: torch.Tensor) -> torch.Tensor:
        """Embedding (B, dim) of measured log-normalised expression (B, G)."""
        if not hasattr(self, "gene_encoder"):
            raise RuntimeError("This model has no gene encoder (instance_loss and group_loss are both off).")
        return self.gene_encoder(expr)

    # ------------------------------------------------------------------------------ training
    def loss(
        self, out: dict[str, torch.Tensor], expr: torch.Tensor, generator: torch.Generator | None = None
    ) -> LossOutput:
        """Total loss ``L_instance + lam * L_group + L_pred`` and its parts, for a batch.

        Parameters
        ----------
        out
            Output of :meth:`forward` for the batch.
        expr
            Measured log-normalised expression (B, G).
        generator
            Random generator of the in-batch k-means seeding.

        Returns
        -------
        :class:`~genedml_sd.model.LossOutput` with ``total`` and the enabled parts ``instance``,
        ``group``, ``pred`` (scalars).
        """
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        tokens = out["tokens"]
        if cfg.instance_loss or cfg.group_loss:
            gene = self.gene_embedding(expr)
        if cfg.instance_loss:
            parts["instance"] = multiscale_instance_loss(tokens.unbind(dim=1), gene, self.tau)
        if cfg.group_loss:
            parts["group"], _ = instance_group_loss(
                self.image_group(tokens.mean(dim=1)),
                self.gene_group(gene),
                k=cfg.k,
                tau=cfg.tau_ig,
                iters=cfg.kmeans_iters,
                generator=generator,
            )
        if cfg.pred_loss:
            parts["pred"] = prediction_loss(out["pred"], expr)
        total = parts.get("instance", 0.0) + cfg.lam * parts.get("group", 0.0) + parts.get("pred", 0.0)
        return LossOutput(cast(torch.Tensor, total), parts)  # a tensor: the config enables at least one loss

    def training_loss(self, batch: SpotBatch) -> LossOutput:
        """Loss of one batch; the global branch attends over the spots of each spot's own slide.

        A batch mixing slides (``TrainArgs(mix_slides=True)``) gets one global pass per slide in it; the
        contrastive losses then compare all spots of the batch, across slides. Logs the instance
        temperature as ``train/tau`` (an ``extra`` of the output) when that loss is on.
        """
        cfg = self.config
        glob = None
        if cfg.use_global:
            parts = [self.global_rows(p.slide.local, p.slide.coords, p.index) for p in batch.parts]
            glob = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = self(batch.local, batch.neighbour, glob)
        loss = self.loss(out, batch.expr)
        return LossOutput(loss.total, loss.parts, {"tau": self.tau} if cfg.instance_loss else {})

    # ------------------------------------------------------------------------------ inference
    def encode_slide(self, local_all: torch.Tensor, coords_um: torch.Tensor) -> torch.Tensor | SlideContext | None:
        """Global-branch tokens of all N spots of a slide, indexable by row chunks (``None`` without the global scale).

        A (N, dim) tensor (exact attention over all spots) when ``config.context_size`` is ``None`` or
        N is at most ``context_size``; otherwise a :class:`~genedml_sd.model.SlideContext` against a
        fixed sample of ``context_size`` spots, which computes the rows of each chunk when indexed.
        """
        cfg = self.config
        if not cfg.use_global:
            return None
        n = int(local_all.shape[0])
        if cfg.context_size is None or n <= cfg.context_size:
            dev = self.device
            return self.encode_global(local_all.to(dev), coords_um.to(dev))
        return SlideContext(self, local_all, coords_um, fixed_context_rows(n, cfg.context_size))

    def predict_batch(
        self, local: torch.Tensor, neighbour: torch.Tensor | None = None, slide_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted expression (B, G) from local (B, D), neighbour (B, 25, D) features and global tokens (B, dim).

        By ``config.predictor``: the head's output, the retrieval from the gene-aligned space
        (:meth:`retrieve`), or their mean (``"blend"``, and ``"auto"`` with a bank before :meth:`select_on_validation`).
        """
        out = self(local, neighbour, slide_rows)
        if not self.config.predicts_from_bank:  # the head, also "auto" with no bank (no instance loss / untrained)
            return out["pred"]
        retrieved = self.retrieve(out["tokens"])
        return retrieved if self.config.predictor == "retrieval" else (out["pred"].float() + retrieved) / 2

    def select_on_validation(self, val: Sequence[SlideTensors]) -> dict[str, object]:
        """With ``predictor="auto"``: keep the predictor with the best validation PCC (see ``model._retrieval.choose_predictor``)."""
        return choose_predictor(self, val) if self.config.predictor == "auto" else {}

    # ------------------------------------------------------------------------------ retrieval predictor
    def prepare(self, train: Sequence[SlideTensors]) -> None:
        """Feature statistics and output bias; with a retrieval predictor also the bank's training expression."""
        super().prepare(train)
        if self.config.retrieves:
            expr = torch.cat([targets(s) for s in train]).float()
            rows = reference_rows(expr.shape[0], self.config.n_reference)
            if rows.numel() != self.config.n_reference:
                raise ValueError(f"{expr.shape[0]} training spots, but config.n_reference={self.config.n_reference}.")
            self.ref_expr.copy_(expr[rows])

    @torch.no_grad()
    def build_reference(self, batch_size: int = 4096) -> None:
        """Recompute the bank's L2-normalised gene embeddings from its expression (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(device_type=self.ref_expr.device.type, enabled=False):
                for s in range(0, self.config.n_reference, batch_size):
                    emb = self.gene_embedding(self.ref_expr[s : s + batch_size].float())
                    self.ref_embedding[s : s + batch_size] = F.normalize(emb.float(), dim=1)
        finally:
            self.train(was_training)

    def retrieve(self, tokens: torch.Tensor) -> torch.Tensor:
        """Expression (B, G) retrieved for fused scale tokens (B, S, dim).

        Similarity of a query to a bank spot is the cosine of its scale tokens with the spot's gene
        embedding, averaged over scales (what the multi-scale instance loss aligns); the prediction is the
        mean expression of the ``top_k`` most similar bank spots.
        """
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            q = F.normalize(tokens.float(), dim=-1).mean(dim=1)  # mean over scales of unit vectors
            sims = q @ self.ref_embedding.T
        return topk_mean_expression(sims, self.ref_expr, self.config.top_k)

    def on_validation_start(self) -> None:
        """Rebuild the retrieval bank with the current weights before each validation."""
        if self.config.retrieves:
            self.build_reference()

    def on_fit_end(self) -> None:
        """Rebuild the retrieval bank with the final (best) weights."""
        if self.config.retrieves:
            self.build_reference()
