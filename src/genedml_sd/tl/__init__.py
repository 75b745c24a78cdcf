"""Tools: train Gene-DML (or another method) on SpatialData slides, predict expression on new ones, evaluate."""

from ._aggregate import aggregate_predictions
from ._compare import compare_methods
from ._cross_validate import cross_validate, leave_one_group_out
from ._ensemble import check_ensemble, fit_ensemble
from ._evaluate import Evaluation, PairedExpression, evaluate, observed_and_predicted, score_predictions
from ._features import EncoderRef, FeatureSpec, choose_feature_mode
from ._fit import fit
from ._hest import HESTSample, HESTTask, hest_benchmark, hest_linear_probe, hest_probe_task, load_hest_task
from ._imported import FeatureTable, describe_feature_table, table_features
from ._methods import list_methods, register_method
from ._metrics import per_gene_pearson
from ._model import TrainedModel
from ._predict import predict
from ._reference import neighbour_mean_expression, neighbour_reference


def __getattr__(name: str):
    if name == "GeneDML":  # renamed in 0.2: it is the trained object of every method, not the Gene-DML module
        import warnings

        warnings.warn(
            "gd.tl.GeneDML was renamed gd.tl.TrainedModel (gd.model.GeneDML is the torch module).",
            FutureWarning,
            stacklevel=2,
        )
        return TrainedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EncoderRef",
    "Evaluation",
    "FeatureSpec",
    "FeatureTable",
    "HESTSample",
    "HESTTask",
    "PairedExpression",
    "TrainedModel",
    "aggregate_predictions",
    "choose_feature_mode",
    "compare_methods",
    "cross_validate",
    "check_ensemble",
    "describe_feature_table",
    "evaluate",
    "fit",
    "fit_ensemble",
    "hest_benchmark",
    "hest_linear_probe",
    "hest_probe_task",
    "leave_one_group_out",
    "list_methods",
    "load_hest_task",
    "neighbour_mean_expression",
    "neighbour_reference",
    "observed_and_predicted",
    "per_gene_pearson",
    "predict",
    "register_method",
    "score_predictions",
    "table_features",
]
