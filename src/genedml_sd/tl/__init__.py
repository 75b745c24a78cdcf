"""Tools: train Gene-DML (or a baseline) on SpatialData slides, predict expression on new ones, evaluate."""

from ._cross_validate import cross_validate, leave_one_group_out
from ._evaluate import Evaluation, evaluate, score_predictions
from ._fit import fit
from ._metrics import per_gene_pearson
from ._model import EncoderRef, GeneDML
from ._predict import predict

__all__ = [
    "EncoderRef",
    "Evaluation",
    "GeneDML",
    "cross_validate",
    "evaluate",
    "fit",
    "leave_one_group_out",
    "per_gene_pearson",
    "predict",
    "score_predictions",
]
