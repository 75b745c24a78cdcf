"""Shared docstring snippets for parameters that many public functions take (in the spirit of squidpy's ``_docs``).

Write ``%(name)s`` alone on a line of a numpydoc ``Parameters`` section (indented like the parameters) and
decorate the function with :func:`docs`; the line is replaced by the snippet, indented to match. Only these
placeholders are touched, so other ``%`` signs in a docstring are safe.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

SNIPPETS: dict[str, str] = {
    "config_dims": """\
enc_dim
    Width D of the frozen encoder's features (filled from the data by :func:`~genedml_sd.tl.fit`).
n_genes
    Number of predicted genes G (likewise).""",
    "slide_keys": """\
image_key, shapes_key, table_key
    Elements to use in each slide: the H&E image, the observations (spots, bins or cells) and the
    raw-counts table.
    Inferred when unambiguous (an error lists the candidates); tables written by
    :func:`~genedml_sd.tl.predict` are never taken as counts.""",
    "layer": """\
layer
    Layer of the counts table holding raw (non-negative, integer-valued) counts, e.g. ``"counts"``;
    default ``X``. Log-normalised or negative values are an error naming the table.""",
    "genes": """\
genes
    Number of highly variable genes to select on the training slides (genes detected in >= 10 % of
    spots, ranked by variance of log-normalised expression), or an explicit list of gene names.""",
    "method": """\
method
    A registered method (:func:`~genedml_sd.tl.list_methods`): ``"gene-dml"`` (default), the second seed
    system ``"nh2st"``, or a baseline on the same features: ``"ridge"`` (PCA-256 + ridge), ``"mlp"``
    (ST-Net-like head), ``"bleep"`` (contrastive retrieval); or one added with
    :func:`~genedml_sd.tl.register_method`.
config
    The method's configuration: a preset name (Gene-DML: ``"full"``, ``"no-multiscale"``,
    ``"no-group"``, ``"contrastive-only"``, ``"no-instance"``, ``"mse-only"``, the paper's ablations;
    other methods: ``"default"``), a dict of fields, or a config object of the method.""",
    "encoder": """\
encoder
    Frozen encoder name (:func:`~genedml_sd.encoders.list_encoders`; ``"uni"`` is the paper's,
    ``"stain-texture"`` works offline) or a loaded :class:`~genedml_sd.encoders.FrozenEncoder`.
pretrained
    ``False`` uses a random-init encoder (for tests and speed benchmarks only).
weights
    Local weights file for the encoder.
hf_token
    Hugging Face token for gated encoders (else ``HF_TOKEN``).
geometry
    Tile geometry; default 112 µm / 224 px tiles and a 5x5 neighbour grid.""",
    "feature_mode": """\
feature_mode
    ``"auto"`` (default) picks the cheapest faithful mode from the encoder calls each would cost
    (logged): ``"dense"`` when observations are denser than tiles (Visium HD bins, cells),
    ``"lattice"`` for spots when the model reads neighbour tokens, else ``"spot"``.
    ``"spot"`` encodes every spot's 5x5 neighbour grid (the paper's, 25 encoder calls per spot);
    ``"lattice"`` encodes a 112 µm lattice over the tissue once and gathers each spot's neighbour
    tokens from it, with an exact spot-centred local tile (about 5 calls per spot on a 200 µm
    lattice; tokens shifted by at most 79 µm); ``"dense"`` encodes only the lattice and reads each
    observation's local feature from it at the observation's position (ViT patch tokens / CNN
    feature maps interpolated, else the covering tile), so encoder calls grow with tissue area, not
    with observations (about 0.005 per 8 µm bin). Predictions use the mode the model was trained with.""",
    "extraction": """\
cache_dir
    Feature cache location (default ``gd.settings.cache_dir / "features"``).
num_workers
    Tile-decoding worker processes for feature extraction.""",
    "training": """\
max_epochs
    Maximum training epochs.
batch_size
    Spots per training batch (256 in the paper).
mix_slides
    ``False`` (default): each batch holds spots of one slide, so contrastive negatives come from that
    slide. ``True``: each batch draws spots from all training slides, so negatives also come from
    other slides and patients (see ``TrainArgs.mix_slides`` of :class:`~genedml_sd.model.TrainArgs`).
val_sections
    Training slides held out for early stopping and model selection: ``"auto"`` holds out one
    slide when there are at least three, ``"patient"`` every slide of one training patient (the one
    with the fewest slides; as ``"auto"`` with fewer than two patients or fewer than two slides left),
    so that validation measures generalisation to an unseen patient rather than to another section of
    a training patient; an int holds out that many (chosen with ``seed``), a list names them, ``None``
    or ``0`` trains without validation (fixed ``max_epochs``).
patience
    Early-stopping patience in epochs (on validation PCC).
seed
    Seed for the split, the weights and the batches.
accelerator, devices, strategy, precision
    Passed to :class:`lightning.pytorch.Trainer` (``devices=2, strategy="ddp"`` for two GPUs;
    ``precision=None`` picks bf16 mixed precision on GPUs that support it, fp32 otherwise).
checkpoint_dir
    Folder for checkpoints: ``last.ckpt`` after every epoch (and the best validation epoch when
    validating), so an interrupted run can continue with ``resume=True``.
resume
    Continue from ``checkpoint_dir/last.ckpt`` (same data, configuration and seed; a mismatch is an error).
trainer_kwargs
    Further :class:`lightning.pytorch.Trainer` arguments, e.g. ``{"num_nodes": 2}`` for a
    multi-node SLURM job (see the installation page).""",
}


def docs(func: F) -> F:
    """Replace ``%(name)s`` lines of ``func.__doc__`` by the shared snippets, indented to match."""
    doc = func.__doc__
    if not doc:
        return func
    lines = []
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith("%(") and stripped.endswith(")s"):
            name = stripped[2:-2]
            if name not in SNIPPETS:
                raise KeyError(f"Unknown docstring snippet {name!r} in {func.__qualname__}.")
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(textwrap.indent(SNIPPETS[name], indent))
        else:
            lines.append(line)
    func.__doc__ = "\n".join(lines)
    return func
