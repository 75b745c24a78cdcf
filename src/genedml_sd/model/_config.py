"""Configuration of the trainable Gene-DML model, with the paper's ablations as presets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from genedml_sd._docs import docs

from ._base import TrainedConfig

if TYPE_CHECKING:
    from ._data import SlideTensors

#: Values of ``GeneDMLConfig.predictor``.
PREDICTORS = ("head", "retrieval", "blend", "auto")

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
    predictor
        How expression is predicted: ``"auto"`` (the default, below), ``"head"`` (the paper's prediction head on the fused scale
        tokens), ``"retrieval"`` (BLEEP-style, from the gene-aligned space: the mean measured expression
        of the ``top_k`` training spots whose gene embeddings are most similar to the query's scale
        tokens, cosine similarity averaged over scales) or ``"blend"`` (the mean of the two). ``"auto"``
        keeps whichever of the three has the highest mean per-gene PCC on the validation slides once
        training ends (training data only, never a test section; the head without validation slides or
        without the instance loss); the saved config then names the chosen one, and validation during
        training (early stopping) uses the blend. Training is the same for all; only prediction
        differs. ``"head"`` is the paper's model (and what models saved before this field existed
        use). Retrieval needs the instance loss (it defines the aligned space).
    top_k
        Training spots retrieved per query (``predictor`` ``"retrieval"`` / ``"blend"``).
    reference_size
        Most training spots in the retrieval bank (a seeded random sample beyond it), so its memory and
        the per-batch similarities stay bounded on Visium HD (``reference_size x (dim + n_genes)``
        floats, ``batch_size x reference_size`` similarities).
    n_reference
        Size of the retrieval bank, set for training by :meth:`for_training` (0 with ``predictor="head"``).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    SAVED_DEFAULTS: ClassVar[dict[str, Any]] = {"predictor": "head"}  # saved before `predictor` existed

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
    predictor: str = "auto"
    top_k: int = 50
    reference_size: int = 50_000
    n_reference: int = 0

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
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}.")
        if self.predictor in ("retrieval", "blend") and not self.instance_loss:
            raise ValueError(
                f"predictor={self.predictor!r} retrieves from the gene-aligned space, which the instance loss "
                "learns: it needs instance_loss=True."
            )
        for name in ("top_k", "reference_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_reference < 0:
            raise ValueError(f"n_reference must be >= 0, got {self.n_reference}.")

    @property
    def retrieves(self) -> bool:
        """Whether prediction uses (or may use) the retrieval bank (``"retrieval"``, ``"blend"``, ``"auto"`` with the instance loss)."""
        return self.predictor in ("retrieval", "blend") or (self.predictor == "auto" and self.instance_loss)

    @property
    def predicts_from_bank(self) -> bool:
        """Whether prediction reads the bank now (``"retrieval"``, ``"blend"``, and ``"auto"``, as the blend, once it has one)."""
        return self.predictor in ("retrieval", "blend") or (self.retrieves and self.n_reference > 0)

    def for_training(self, train: Sequence[SlideTensors]) -> GeneDMLConfig:
        """A copy with ``n_reference`` set: the retrieval bank's size for these slides (0 with the head alone)."""
        n = sum(s.n_spots for s in train)
        return self.replace(n_reference=min(n, self.reference_size) if self.retrieves else 0)

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
