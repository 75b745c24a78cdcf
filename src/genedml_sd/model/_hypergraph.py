"""NH2ST building blocks: weighted contrastive loss, top-k similarity hypergraphs, HGNN convolution, cross-attention.

Pure torch; see :class:`~genedml_sd.model.NH2ST` for how they are put together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
    ``HypergraphEncoder`` between layers.
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
