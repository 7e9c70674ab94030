"""Binary classification metrics with PNEUMONIA as the positive class."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

METRIC_NAMES = ("accuracy", "roc_auc", "sensitivity", "specificity")


def binary_metrics(
    y_true, probability, threshold: float | np.ndarray
) -> dict[str, float | int | None]:
    """n, accuracy, ROC AUC, sensitivity, specificity and the threshold used (one for all, or
    one per image: then `threshold` is None).

    A metric that is undefined on the data (ROC AUC or a rate over a class that is absent)
    is None, never NaN, so the result is valid JSON.
    """
    y_true = np.asarray(y_true, dtype=int)
    probability = np.asarray(probability, dtype=float)
    cut = np.asarray(threshold, dtype=float)
    predicted = (probability >= cut).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "n": len(y_true),
        "accuracy": _rate(tp + tn, len(y_true)),
        "roc_auc": float(roc_auc_score(y_true, probability)) if both_classes else None,
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "threshold": float(cut) if cut.ndim == 0 else None,
    }


def _rate(hits: int, total: int) -> float | None:
    return float(hits / total) if total else None


def is_number(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)
