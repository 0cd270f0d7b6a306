"""Evaluation of models on labelled data, for medical physicists (``preannot evaluate``)."""

from node.evaluate.dataset import Case, Dataset, discover, load_reference
from node.evaluate.metrics import label_metrics, lesion_matches
from node.evaluate.run import EvalOptions, evaluate

__all__ = ["Case", "Dataset", "EvalOptions", "discover", "evaluate", "label_metrics", "lesion_matches",
           "load_reference"]
