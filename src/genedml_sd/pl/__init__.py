"""Plotting: predicted vs observed expression on the H&E, per-gene and cross-validation scores, training curves.

All functions draw with matplotlib and return the :class:`~matplotlib.figure.Figure`. Slide panels
are rendered with spatialdata-plot, imported on first use (as are matplotlib and torch).
"""

from ._predictions import predicted_vs_observed
from ._reliability import gene_reliability
from ._scores import gene_scores
from ._training import training_curves
from ._uncertainty import uncertainty

__all__ = ["gene_reliability", "gene_scores", "predicted_vs_observed", "training_curves", "uncertainty"]
