"""Preprocessing: gene selection, expression normalisation, tissue masks and spot grids for H&E-only slides."""

from ._counts import check_raw_counts
from ._genes import TARGET_SUM, log_normalize, normalized_expression, select_genes
from ._grid import spot_grid, tissue_mask

__all__ = [
    "TARGET_SUM",
    "check_raw_counts",
    "log_normalize",
    "normalized_expression",
    "select_genes",
    "spot_grid",
    "tissue_mask",
]
