"""Gene-DML losses: multi-scale instance (soft-target contrastive), cross-level instance-group, MSE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._kmeans import kmeans


def soft_target_instance_loss(image: torch.Tensor, gene: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """BLEEP-style contrastive loss between image and gene embeddings of the same spots.

    With ``I`` and ``E`` the L2-normalised embeddings (N, C)::

        T      = softmax((I I^T + E E^T) / (2 tau))          (soft targets, no gradient)
        logits = I E^T / tau
        loss   = (CE(logits, T) + CE(logits^T, T^T)) / 2      (mean over rows)

    Spots with similar images *and* similar expression are not pushed apart as hard negatives.

    Parameters
    ----------
    image, gene
        Embeddings (N, C) of the same N spots, in the same order.
    tau
        Temperature (> 0).

    Returns
    -------
    Scalar loss.
    """
    i = F.normalize(image.float(), dim=1)
    e = F.normalize(gene.float(), dim=1)
    logits = i @ e.T / tau
    with torch.no_grad():
        targets = F.softmax((i @ i.T + e @ e.T) / (2 * tau), dim=1)
    rows = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    cols = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (rows + cols) / 2


def multiscale_instance_loss(
    images: Sequence[torch.Tensor], gene: torch.Tensor, tau: torch.Tensor | float
) -> torch.Tensor:
    """Mean of :func:`~genedml_sd.model.soft_target_instance_loss` over the scales' image embeddings (list of (N, C))."""
    if len(images) == 0:
        raise ValueError("multiscale_instance_loss needs at least one scale.")
    return torch.stack([soft_target_instance_loss(im, gene, tau) for im in images]).mean()


def instance_group_loss(
    image_group: torch.Tensor,
    gene_group: torch.Tensor,
    *,
    k: int,
    tau: float = 0.07,
    iters: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-level instance-group loss (after CLD, Wang et al. 2021), across modalities.

    Each modality's group features are clustered in the batch (spherical k-means, detached). Each
    spot's *image* group feature must then pick the cluster of its *gene* group feature among the
    gene centroids, and vice versa::

        loss = CE(norm(g_I) C_G^T / tau, a_G) + CE(norm(g_E) C_I^T / tau, a_I)

    Parameters
    ----------
    image_group, gene_group
        Group features (N, C) of the same spots.
    k
        Clusters per modality (``min(k, N)``).
    tau
        Temperature tau_IG.
    iters
        k-means iterations.
    generator
        Random generator for the k-means++ seeding.

    Returns
    -------
    The loss and a dict with the centroids and assignments (``gene_centroids``, ``gene_labels``,
    ``image_centroids``, ``image_labels``).
    """
    c_g, a_g = kmeans(gene_group, k, iters=iters, generator=generator)
    c_i, a_i = kmeans(image_group, k, iters=iters, generator=generator)
    gi = F.normalize(image_group.float(), dim=1)
    ge = F.normalize(gene_group.float(), dim=1)
    c_g, c_i = c_g.to(gi.device), c_i.to(gi.device)
    loss = F.cross_entropy(gi @ c_g.T / tau, a_g.to(gi.device)) + F.cross_entropy(ge @ c_i.T / tau, a_i.to(gi.device))
    return loss, {"gene_centroids": c_g, "gene_labels": a_g, "image_centroids": c_i, "image_labels": a_i}


def prediction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over spots and genes (float32)."""
    return F.mse_loss(pred.float(), target.float())


def mean_gene_pcc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson r across spots, skipping genes constant on either side.

    Parameters
    ----------
    pred, target
        (N, G) predicted and measured expression.

    Returns
    -------
    Scalar tensor (NaN if every gene is constant).
    """
    p = pred.float() - pred.float().mean(0)
    t = target.float() - target.float().mean(0)
    denom = (p.square().sum(0) * t.square().sum(0)).sqrt()
    ok = denom > 0
    if not ok.any():
        return torch.tensor(float("nan"), device=pred.device)
    return ((p * t).sum(0)[ok] / denom[ok]).mean()
