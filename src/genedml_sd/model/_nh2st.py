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

This module imports only torch and numpy; the Lightning training (:func:`train_nh2st`) imports
Lightning when called.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._data import SlideTensors


# =============================================================================== neighbourhood
def estimate_pitch(coords_um: torch.Tensor | np.ndarray, *, max_samples: int = 1024, refine: int = 3) -> float:
    """Lattice pitch (µm) of a spot layout, from nearest-neighbour distances.

    Starts from the median nearest-neighbour distance ``p``, then (``refine`` times) replaces it by
    the median of the distances to each spot's 8 nearest spots that lie in ``(0.5 p, 1.3 p)``: the
    first lattice ring (4 spots on a square lattice, 6 on a hexagonal one; the square diagonals at
    ``1.41 p`` and the second hexagonal ring at ``1.73 p`` are excluded). On an exact lattice both
    agree; under positional jitter the plain nearest-neighbour median is biased low (it is a minimum
    over the ring), the refined one is not.

    The distances are taken for at most ``max_samples`` spots (evenly spaced in the input order, so
    the result is deterministic), each against *all* spots: ``O(max_samples x N)``, in chunks.
    Coincident spots (distance 0) are ignored.

    Parameters
    ----------
    coords_um
        Spot centres in µm, (N, 2), N >= 2.
    max_samples
        Number of spots whose neighbour distances enter the medians.
    refine
        Refinement iterations (0: the median nearest-neighbour distance).

    Returns
    -------
    The pitch in µm.
    """
    c = torch.as_tensor(np.asarray(coords_um, dtype=np.float64))
    n = c.shape[0]
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {tuple(c.shape)}.")
    if n < 2:
        raise ValueError("Estimating the lattice pitch needs at least 2 spots.")
    c = (c - c.mean(0)).float()
    sample = np.unique(np.linspace(0, n - 1, min(n, max_samples)).round().astype(np.int64))
    k = min(8, n)
    near = []
    for s in range(0, len(sample), 128):
        rows = torch.from_numpy(sample[s : s + 128])
        d = torch.cdist(c[rows], c, compute_mode="donot_use_mm_for_euclid_dist")
        d[d <= 1e-6] = math.inf  # the spot itself and exact duplicates
        near.append(d.topk(k, dim=1, largest=False).values.double())
    dist = torch.cat(near)  # (samples, k), ascending, inf where fewer distinct spots
    nearest = dist[:, 0][torch.isfinite(dist[:, 0])]
    if nearest.numel() == 0:
        raise ValueError("All spots coincide; cannot estimate the lattice pitch.")
    pitch = float(nearest.median())
    for _ in range(refine):
        ring = dist[(dist > 0.5 * pitch) & (dist < 1.3 * pitch)]
        if ring.numel() == 0:
            break
        pitch = float(ring.median())
    return pitch


def spot_neighbourhood(
    coords_um: torch.Tensor | np.ndarray, pitch_um: float | None = None, radius: int = 2
) -> torch.Tensor:
    """Indices of the spots in the ``(2r+1) x (2r+1)`` lattice neighbourhood of every spot.

    The lattice offset of spot j from spot i is ``round((c_j - c_i) / pitch)`` (per axis, halves
    rounded up). Slot ``(dy + r) * (2r + 1) + (dx + r)`` of row i holds the spot at offset
    ``(dx, dy)`` with ``|dx|, |dy| <= r`` (x = first coordinate), -1 where there is none; the centre
    slot is always the spot itself. If several spots fall in one slot, the one closest to the exact
    lattice offset wins (coincident duplicates of spot i never appear in its row).

    Offsets are pairwise, so the result does not depend on the origin and tolerates positional jitter
    below a quarter of the pitch. Spots are bucketed in a hash grid of cell size ``pitch`` (a sort +
    binary search), and only the ``(2r+3)^2`` surrounding cells are searched: ``O(N log N)``.

    Square lattices (legacy ST, 200 µm pitch) map one-to-one onto the slots. On a hexagonal Visium
    lattice (rows ``pitch * sqrt(3)/2`` apart, odd rows shifted by half a pitch) rounding on the pitch
    still gives a compact neighbourhood: with ``r = 2`` the rows at ``±0.87`` and ``±1.73`` pitch map to
    ``dy = ±1, ±2`` without collisions, and a half-pitch shift ``dx = ±0.5`` is rounded up (to 1 and 0),
    so the neighbourhood is the 5 nearest hexagonal rows, slightly skewed within shifted rows.

    Parameters
    ----------
    coords_um
        Spot centres in µm, (N, 2).
    pitch_um
        Centre-to-centre distance of the lattice in µm; ``None`` estimates it as the median
        nearest-neighbour distance, refined (:func:`estimate_pitch`).
    radius
        Neighbourhood radius r in lattice steps (2 for the 5x5 neighbourhood).

    Returns
    -------
    LongTensor (N, (2r+1)^2) of spot indices, -1 for empty slots (on the CPU).
    """
    c = np.asarray(coords_um.detach().cpu() if isinstance(coords_um, torch.Tensor) else coords_um, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got {c.shape}.")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    n = c.shape[0]
    side = 2 * radius + 1
    t = side * side
    centre = t // 2
    out = np.full((n, t), -1, dtype=np.int64)
    if n == 0:
        return torch.from_numpy(out)
    if not np.isfinite(c).all():
        raise ValueError("coords contain NaN or infinite values.")
    if pitch_um is None:
        if n < 2:
            out[:, centre] = np.arange(n)
            return torch.from_numpy(out)
        pitch_um = estimate_pitch(c)
    if not pitch_um > 0:
        raise ValueError(f"pitch_um must be > 0, got {pitch_um}.")

    u = (c - c.min(axis=0)) / float(pitch_um)  # lattice units, >= 0
    cell = np.floor(u).astype(np.int64)
    w = radius + 1  # |round(off)| <= r  =>  |cell difference| <= r + 1
    nx = int(cell[:, 0].max()) + 1 + 2 * w  # padded row length: no wrap-around between rows
    key = (cell[:, 1] + w) * nx + (cell[:, 0] + w)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    best = np.full((n, t), np.inf)
    for dy in range(-w, w + 1):
        for dx in range(-w, w + 1):
            query = key + dy * nx + dx
            lo = np.searchsorted(sorted_key, query, side="left")
            count = np.searchsorted(sorted_key, query, side="right") - lo
            m = 0
            while True:  # m-th spot of each searched cell (cells hold few spots)
                i = np.flatnonzero(count > m)
                if i.size == 0:
                    break
                j = order[lo[i] + m]
                off = u[j] - u[i]
                s = np.floor(off + 0.5)
                ok = (np.abs(s) <= radius).all(axis=1)
                i, j, off, s = i[ok], j[ok], off[ok], s[ok]
                err = ((off - s) ** 2).sum(axis=1)
                slot = ((s[:, 1] + radius) * side + (s[:, 0] + radius)).astype(np.int64)
                better = err < best[i, slot]  # each i appears once per pass: no write conflicts
                best[i[better], slot[better]] = err[better]
                out[i[better], slot[better]] = j[better]
                m += 1
    out[:, centre] = np.arange(n)
    return torch.from_numpy(out)


# ====================================================================================== config
@dataclass(frozen=True)
class NH2STConfig:
    """Hyper-parameters of :class:`NH2ST` and its training.

    Attributes
    ----------
    enc_dim
        Width D of the frozen encoder's features.
    n_genes
        Number of predicted genes G.
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
    step_size, gamma
        StepLR schedule (epochs, factor).
    pitch_um
        Lattice pitch of the spots in µm; ``None`` estimates it per slide.
    use_local, use_neighbour, use_global
        Class constants (not fields): NH2ST reads only local-tile features; the package asks configs
        whether to extract 5x5 grid-tile features, which NH2ST does not need.
    """

    use_local: ClassVar[bool] = True
    use_neighbour: ClassVar[bool] = False
    use_global: ClassVar[bool] = False
    method: ClassVar[str] = "nh2st"

    enc_dim: int
    n_genes: int
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
    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 20
    gamma: float = 0.95
    pitch_um: float | None = None

    def __post_init__(self) -> None:
        for name in ("enc_dim", "n_genes", "dim", "n_heads", "hg_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("radius", "top_k", "query_weight", "neighbour_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}.")
        for name in ("tau", "neg_weight", "lr"):
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

    @property
    def scales(self) -> tuple[str, ...]:
        """Image scales the model reads (only the local tile)."""
        return ("local",)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NH2STConfig:
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"Unknown NH2STConfig fields: {unknown}.")
        return cls(**d)

    def replace(self, **changes: Any) -> NH2STConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


# ====================================================================================== losses
def weighted_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, tau: float = 0.05, neg_weight: float = 0.1
) -> torch.Tensor:
    """Symmetric InfoNCE between two embeddings of the same spots, with down-weighted negatives.

    With ``s_ij = cos(a_i, b_j) / tau``::

        L_ab = mean_i -log( exp(s_ii) / (exp(s_ii) + neg_weight * sum_{j != i} exp(s_ij)) )
        L_ba = the same on s^T;   loss = (L_ab + L_ba) / 2

    i.e. cross-entropy with the diagonal as targets after adding ``log(neg_weight)`` to the
    off-diagonal logits. ``neg_weight = 1`` is the standard symmetric InfoNCE (CLIP loss).

    Parameters
    ----------
    a, b
        Embeddings (N, C) of the same N spots, in the same order (need not be normalised).
    tau
        Temperature (> 0).
    neg_weight
        Weight of the negatives (> 0).

    Returns
    -------
    Scalar loss (float32).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be (N, C) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if not neg_weight > 0:
        raise ValueError(f"neg_weight must be > 0, got {neg_weight}.")
    n = a.shape[0]
    logits = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T / tau
    if neg_weight != 1:
        off = ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits + off * math.log(neg_weight)
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ================================================================================== hypergraph
def hypergraph_incidence(x: torch.Tensor, mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Incidence matrices of the top-k similarity hypergraphs of batched node sets.

    Hyperedge ``e_t`` (one per valid node t) = ``{t}`` plus the ``top_k`` valid nodes most similar to
    t (cosine of the node features; fewer if fewer are valid). Missing nodes belong to no hyperedge
    and have none of their own.

    Parameters
    ----------
    x
        Node features (B, T, C).
    mask
        Valid nodes, bool (B, T).
    top_k
        Neighbours per hyperedge besides its centre node.

    Returns
    -------
    H, float32 (B, T nodes, T hyperedges): ``H[b, v, e] = 1`` if node v is in hyperedge e.
    """
    b, t, _ = x.shape
    mask = mask.bool()
    valid = mask.float()
    eye = torch.eye(t, dtype=torch.bool, device=x.device)
    edges = torch.diag_embed(valid)  # (B, edge, node): every valid node is in its own hyperedge
    k = min(top_k, t - 1)
    if k > 0:
        xn = F.normalize(torch.where(mask[..., None], x.detach().float(), 0.0), dim=-1)
        sim = xn @ xn.transpose(1, 2)  # (B, edge centre, node)
        sim = sim.masked_fill(~mask[:, None, :] | eye, -math.inf)
        vals, idx = sim.topk(k, dim=-1)
        member = torch.isfinite(vals).float() * valid[..., None]  # no hyperedge for missing centres
        edges = edges.scatter_add(2, idx, member)
    return edges.transpose(1, 2).contiguous()


def hypergraph_propagation(incidence: torch.Tensor) -> torch.Tensor:
    """HGNN propagation matrix ``Dv^-1/2 H De^-1 H^T Dv^-1/2`` with unit hyperedge weights.

    Parameters
    ----------
    incidence
        H, (B, T nodes, E hyperedges), from :func:`hypergraph_incidence`.

    Returns
    -------
    (B, T, T) float32; rows and columns of nodes in no hyperedge (missing nodes) are zero.
    """
    h = incidence.float()
    dv = h.sum(dim=2)
    de = h.sum(dim=1)
    dv_is = torch.where(dv > 0, dv.clamp_min(1e-12).rsqrt(), torch.zeros_like(dv))
    de_inv = torch.where(de > 0, 1.0 / de.clamp_min(1e-12), torch.zeros_like(de))
    p = (h * de_inv[:, None, :]) @ h.transpose(1, 2)
    return dv_is[:, :, None] * p * dv_is[:, None, :]


class HypergraphConv(nn.Module):
    """One hypergraph convolution (HGNN, Feng et al. 2019): ``X' = P X Theta + b``.

    ``P`` is the propagation matrix of :func:`hypergraph_propagation`; the nonlinearity is applied by
    :class:`HypergraphEncoder` between layers.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.theta = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor, propagation: torch.Tensor) -> torch.Tensor:
        """Convolve node features (B, T, C_in) with a propagation matrix (B, T, T) -> (B, T, C_out)."""
        y = self.theta(x)
        return propagation.to(y.dtype) @ y + self.bias


class HypergraphEncoder(nn.Module):
    """Stack of :class:`HypergraphConv` layers over a top-k similarity hypergraph.

    The hypergraph is built once per call from the input node features (detached; see
    :func:`hypergraph_incidence`) and shared by all layers. Layers are separated by GELU and dropout;
    missing nodes are zeroed on input and output and, having no incidence, cannot influence valid
    nodes.

    Parameters
    ----------
    dim
        Node feature width (input and output).
    n_layers
        Number of convolutions.
    top_k
        Similar nodes per hyperedge.
    dropout
        Dropout between layers.
    """

    def __init__(self, dim: int, n_layers: int = 2, top_k: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.top_k = top_k
        self.layers = nn.ModuleList([HypergraphConv(dim, dim) for _ in range(n_layers)])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode node features (B, T, dim) with valid-node mask bool (B, T) -> (B, T, dim)."""
        keep = mask.bool()[..., None]
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        prop = hypergraph_propagation(hypergraph_incidence(x, mask, self.top_k))
        for i, layer in enumerate(self.layers):
            x = layer(x, prop)
            if i < len(self.layers) - 1:
                x = self.drop(F.gelu(x))
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ============================================================================= cross-attention
class CrossAttention(nn.Module):
    """Multi-head cross-attention of query tokens over the other modality's tokens, + MLP.

    ``z = proj(softmax(q(LN(x)) k(LN(y))^T / sqrt(d_h)) v(LN(y)))``, then ``z + MLP(LN(z))``. There is
    deliberately **no residual to the query stream**: the output carries the *other* modality's
    content, selected by the query. Used in both directions (image queries -> gene tokens and gene
    queries -> image tokens), the two outputs of a level hold the two modalities on opposite sides,
    so the contrastive loss that matches them cannot be solved by copying one modality into both.

    Parameters
    ----------
    dim
        Token width.
    n_heads
        Attention heads (``dim`` divisible by it).
    dropout
        Dropout in the MLP.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries x (B, Tq, C) attend to y (B, Tk, C); ``key_mask`` bool (B, Tk) marks valid keys.

        Every row needs at least one valid key. Returns (B, Tq, C).
        """
        b, tq, c = x.shape
        tk = y.shape[1]
        h = self.n_heads
        q = self.q(self.norm_q(x)).reshape(b, tq, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(y)).reshape(b, tk, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        z = self.proj(z.transpose(1, 2).reshape(b, tq, c))
        return z + self.drop(self.mlp(self.norm_out(z)))


# ======================================================================================== model
class NH2ST(nn.Module):
    """NH2ST on cached local-tile features: query + neighbour hypergraph branches, image decoder.

    * Image embedding ``Linear(D, dim)`` of standardised local features (shared by the target and
      the neighbourhood nodes); gene embedding ``Linear(G, dim) -> GELU -> Linear(dim, dim)`` of
      log-normalised expression (shared likewise; training only).
    * Query level: one image token and one gene token per spot; :class:`CrossAttention` image ->
      gene and gene -> image (with a single key the attention weight is 1, so this level reduces to a
      learned cross-modal value mapping + MLP); contrastive loss between the two outputs.
    * Neighbour level: the ``(2r+1)^2`` slots of :func:`spot_neighbourhood` (centre = target) are the
      nodes; :class:`HypergraphEncoder` for image nodes and for gene nodes; image nodes attend to the
      gene nodes and gene nodes to the image nodes (missing nodes masked as keys); each output is
      mean-pooled over the valid nodes; contrastive loss between the two pooled vectors.
    * Decoder ``Linear(dim, dim) -> GELU -> Dropout -> Linear(dim, G)`` on the target's image
      embedding (before cross-attention), trained with MSE; it alone makes predictions.

    Total loss: ``query_weight * L_query + neighbour_weight * L_neighbour + mse_weight * MSE``.

    Frozen-encoder features are standardised with per-dimension training statistics stored as
    buffers (:meth:`set_feature_stats`), so they travel with the weights.
    """

    def __init__(self, config: NH2STConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.dim
        self.register_buffer("feature_mean", torch.zeros(cfg.enc_dim))
        self.register_buffer("feature_std", torch.ones(cfg.enc_dim))
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
    def set_feature_stats(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Set the per-dimension standardisation of the frozen features (training statistics), (D,)."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def set_output_bias(self, mean_expression: torch.Tensor | np.ndarray) -> None:
        """Initialise the decoder's last bias to the mean training expression (G,)."""
        with torch.no_grad():
            self.decoder[-1].bias.copy_(torch.as_tensor(np.asarray(mean_expression), dtype=torch.float32))

    # ------------------------------------------------------------------------------ embeddings
    def image_embedding(self, local: torch.Tensor) -> torch.Tensor:
        """Image embedding (..., dim) of local features (..., D)."""
        return self.image_proj((local.float() - self.feature_mean) / self.feature_std)

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
    ) -> dict[str, torch.Tensor]:
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
        Dict of scalars ``total``, ``query``, ``neighbour``, ``mse`` (a part with weight 0 is 0).
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
        return {"total": total, "query": query, "neighbour": neighbour, "mse": mse}

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_slide(
        self,
        local_all: torch.Tensor,
        coords_um: torch.Tensor,
        neighbour_all: torch.Tensor | None = None,
        *,
        batch_size: int = 1024,
    ) -> torch.Tensor:
        """Predict all spots of one slide from their local features (same signature as GeneDML's).

        Parameters
        ----------
        local_all
            Local features (N, D) (on any device; batches are moved to the model's).
        coords_um
            Spot centres in µm (N, 2); unused (prediction needs only the spot's own image).
        neighbour_all
            Ignored (NH2ST uses no grid-tile features).
        batch_size
            Spots per forward pass.

        Returns
        -------
        (N, G) predicted log-normalised expression, float32 on the model's device.
        """
        dev = self.feature_mean.device
        out = [
            self(local_all[s : s + batch_size].to(dev))["pred"].float()
            for s in range(0, local_all.shape[0], batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.config.n_genes, device=dev)


# ===================================================================================== training
def train_nh2st(
    train: Sequence[SlideTensors],
    val: Sequence[SlideTensors] | None,
    config: NH2STConfig,
    *,
    max_epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    patience: int = 10,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Train NH2ST with Lightning (imported here; see :mod:`genedml_sd.model._nh2st_lightning`).

    Batches of spots stay within a slide; each slide's spot neighbourhood is computed once from its
    coordinates. With validation slides, training stops early when the validation mean per-gene
    PCC has not improved for ``patience`` epochs, and the best epoch's weights are restored.

    Parameters
    ----------
    train, val
        Slides with local features, coordinates (µm) and expression (grid-tile features unused).
    config
        Model configuration (``enc_dim``, ``n_genes`` must match the slides).
    max_epochs, batch_size, seed
        Training length, spots per batch, seed (weights and batch order).
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer` (``precision=None``: see
        :func:`~genedml_sd.model._lightning.resolve_precision`).
    patience
        Early-stopping patience (epochs), only with validation.
    checkpoint_dir
        Where the best checkpoint is written (a temporary folder by default).
    progress
        Show Lightning's progress bar.
    trainer_kwargs
        Further :class:`~lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The trained ``LitNH2ST``; ``.model`` is the :class:`NH2ST`, ``.history`` the per-epoch metrics
    (``train/total``, ``train/query``, ``train/neighbour``, ``train/mse``, ``val/pcc``, ``val/mse``).
    """
    from ._nh2st_lightning import fit_nh2st

    return fit_nh2st(
        train,
        val,
        config,
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        patience=patience,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        trainer_kwargs=trainer_kwargs,
    )
