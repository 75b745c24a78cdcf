"""Preprocessing: gene selection, normalisation, tissue masks, spot / bin grids and bin aggregation."""

from ._aggregate import aggregate_bins, aggregate_values
from ._counts import check_raw_counts
from ._genes import TARGET_SUM, log_normalize, normalized_expression, select_genes
from ._grid import spot_grid
from ._tissue import tissue_mask

__all__ = [
    "TARGET_SUM",
    "aggregate_bins",
    "aggregate_values",
    "check_raw_counts",
    "log_normalize",
    "normalized_expression",
    "select_genes",
    "spot_grid",
    "tissue_mask",
]
