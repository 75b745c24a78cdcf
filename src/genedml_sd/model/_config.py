"""Configuration of the trainable Gene-DML model, with the paper's ablations as presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from genedml_sd._docs import docs

from ._base import TrainedConfig

PRESETS: dict[str, dict[str, Any]] = {
    # the full model of the paper: three scales, both contrastive pathways, MSE
    "full": {},
    # local tile only (no neighbour / global scale), both contrastive losses
    "no-multiscale": {"use_neighbour": False, "use_global": False},
    # all scales, no cross-level instance-group loss
    "no-group": {"group_loss": False},
    # all scales, no multi-scale instance loss
    "no-instance": {"instance_loss": False},
    # the paper's ablation baseline: local tile, instance contrastive loss + MSE only
    "contrastive-only": {"use_neighbour": False, "use_global": False, "group_loss": False},
    # no contrastive learning at all: the three-scale regressor trained with MSE
    "mse-only": {"instance_loss": False, "group_loss": False},
}


@docs
@dataclass(frozen=True)
class GeneDMLConfig(TrainedConfig):
    """Hyper-parameters of :class:`~genedml_sd.model.GeneDML` and its training.

    Every piece of the method can be switched off, so that the paper's ablations are configs.

    Attributes
    ----------
    %(config_dims)s
    dim
        Width of the per-scale image embeddings and the gene embedding (512 in the paper).
    use_local, use_neighbour, use_global
        Which scales the model uses (local tile, 5x5 neighbour grid, all spots of the slide).
    n_neighbours
        Number of neighbour tokens per spot (``grid**2``, 25).
    neighbour_depth
        Self-attention blocks over the neighbour tokens.
    global_depth
        Transformer blocks over all spots of a slide.
    fusion_depth
        Self-attention blocks over the (up to) three scale tokens.
    n_heads
        Attention heads in every block.
    mlp_ratio
        Hidden width of the blocks' MLPs, relative to ``dim``.
    dropout
        Dropout in blocks, gene encoder and head.
    gene_hidden
        Hidden width d of the gene encoder.
    group_dim
        Width of the group features of the instance-group loss.
    instance_loss, group_loss, pred_loss
        Switch the multi-scale instance loss, the cross-level instance-group loss and the MSE.
    tau_init
        Initial temperature of the instance loss.
    learn_tau
        Learn the instance temperature (CLIP style, clamped to [0.01, 1]).
    k
        Number of in-batch k-means clusters per modality (18 for HER2ST in the paper).
    kmeans_iters
        Lloyd iterations of the in-batch k-means.
    tau_ig
        Temperature of the instance-group loss.
    lam
        Weight lambda of the instance-group loss.
    lr, weight_decay
        Adam learning rate and weight decay.
    step_size, gamma, lr_interval
        StepLR schedule: the rate is multiplied by ``gamma`` every ``step_size`` units of ``lr_interval``
        (``"epoch"``, as the paper states, or ``"step"``: optimiser steps).
    pos_min_um, pos_max_um
        Shortest and longest wavelength (µm) of the 2-D sinusoidal encoding of spot positions in
        the global branch.
    attn_chunk
        Query chunk size of the global attention; bounds its memory to ``attn_chunk x n_spots``
        scores per head.
    context_size
        Most spots the global branch attends over. Slides with at most this many spots get the
        paper's exact attention over all of them; on larger slides the branch attends over the
        batch plus randomly drawn spots (``context_size`` in all, redrawn every step) in training
        and over a fixed seeded sample of ``context_size`` spots in prediction, so training costs
        O(N context_size) per epoch instead of O(N^3 / batch_size). ``None``: always exact (the
        paper's; infeasible beyond about 10^4 spots per slide).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    dim: int = 512
    use_local: bool = True
    use_neighbour: bool = True
    use_global: bool = True
    n_neighbours: int = 25
    neighbour_depth: int = 2
    global_depth: int = 1
    fusion_depth: int = 1
    n_heads: int = 8
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    gene_hidden: int = 512
    group_dim: int = 128
    instance_loss: bool = True
    group_loss: bool = True
    pred_loss: bool = True
    tau_init: float = 0.07
    learn_tau: bool = True
    k: int = 18
    kmeans_iters: int = 10
    tau_ig: float = 0.07
    lam: float = 0.8
    pos_min_um: float = 100.0
    pos_max_um: float = 20000.0
    attn_chunk: int = 4096
    context_size: int | None = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.use_local or self.use_neighbour or self.use_global):
            raise ValueError("At least one of use_local, use_neighbour, use_global must be True.")
        if not (self.instance_loss or self.group_loss or self.pred_loss):
            raise ValueError("At least one loss (instance_loss, group_loss, pred_loss) must be on.")
        if not self.pred_loss:
            raise ValueError("pred_loss=False leaves the prediction head untrained; predictions need it.")
        for name in ("dim", "n_heads", "k", "n_neighbours", "gene_hidden", "group_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}.")
        if self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by 4 (2-D sinusoidal position encoding).")
        if self.context_size is not None and (isinstance(self.context_size, bool) or self.context_size < 2):
            raise ValueError(f"context_size must be None or an integer >= 2, got {self.context_size!r}.")
        for name in ("tau_init", "tau_ig"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GeneDMLConfig:
        """A named configuration (see :data:`~genedml_sd.model.PRESETS`), with field overrides.

        Parameters
        ----------
        name
            ``"full"``, ``"no-multiscale"``, ``"no-group"``, ``"no-instance"``, ``"contrastive-only"``
            or ``"mse-only"``.
        **overrides
            Fields to set, at least ``enc_dim`` and ``n_genes``.
        """
        if name not in cls.PRESETS:
            raise KeyError(f"Unknown config preset {name!r}; available: {sorted(cls.PRESETS)}.")
        return cls.from_dict({**cls.PRESETS[name], **overrides})
