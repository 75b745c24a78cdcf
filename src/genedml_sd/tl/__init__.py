"""Tools: train Gene-DML on SpatialData slides and predict expression on new ones."""

from ._fit import fit
from ._metrics import per_gene_pearson
from ._model import EncoderRef, GeneDML
from ._predict import predict

__all__ = ["EncoderRef", "GeneDML", "fit", "per_gene_pearson", "predict"]
