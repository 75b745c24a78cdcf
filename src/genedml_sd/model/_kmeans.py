"""Spherical k-means with k-means++ seeding, batched in torch (used inside each training batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster unit vectors by cosine similarity.

    Parameters
    ----------
    x
        Points, (N, C). They are L2-normalised here; gradients are not tracked.
    k
        Number of clusters; ``min(k, N)`` are used.
    iters
        Lloyd iterations after k-means++ seeding.
    generator
        Random generator for the seeding (default: torch's global one).

    Returns
    -------
    centroids
        Unit-norm centroids, float32 (k', C).
    labels
        Cluster of each point, int64 (N,).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, C) tensor, got shape {tuple(x.shape)}.")
    with torch.no_grad():
        x = F.normalize(x.detach().float(), dim=1)
        n = x.shape[0]
        k = max(1, min(int(k), n))
        centroids = _kmeans_pp(x, k, generator)
        labels = (x @ centroids.T).argmax(dim=1)
        for _ in range(iters):
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            empty = counts == 0
            # an empty cluster keeps its previous centroid
            sums[empty] = centroids[empty]
            centroids = F.normalize(sums, dim=1)
            new = (x @ centroids.T).argmax(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
    return centroids, labels


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on unit vectors, with cosine distance ``1 - x.c``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device="cpu").item())
    chosen = [first]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:  # all remaining points coincide with a centre: pick any unused one
            unused = torch.ones(n, dtype=torch.bool, device=x.device)
            unused[chosen] = False
            nxt = int(torch.nonzero(unused)[0])
        else:
            probs = (dist / total).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    return x[chosen].clone()
