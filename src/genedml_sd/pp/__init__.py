"""Preprocessing: gene selection and expression normalisation."""

from ._genes import TARGET_SUM, log_normalize, normalized_expression, select_genes

__all__ = ["TARGET_SUM", "log_normalize", "normalized_expression", "select_genes"]
