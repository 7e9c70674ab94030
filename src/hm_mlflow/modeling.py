"""The estimator, patient-grouped cross-validation, calibration and the decision threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from hm_mlflow.metrics import METRIC_NAMES, binary_metrics

DEFAULT_PARAMS = {"C": 0.01}


def build_estimator(params: dict | None = None) -> Pipeline:
    """Standardised features into an L2 logistic regression with balanced class weights."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("classify", LogisticRegression(C=params["C"], class_weight="balanced", max_iter=5000)),
        ]
    )


def group_splits(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list:
    """Stratified folds in which each patient's images stay together."""
    n_folds = min(n_folds, len(np.unique(groups)))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def fit_calibrated(
    X, y, groups, params: dict | None = None, n_folds: int = 5, seed: int = 0
) -> ClassifierMixin:
    """Fit on all of (X, y) with sigmoid calibration learnt on patient-grouped folds."""
    calibrated = CalibratedClassifierCV(
        build_estimator(params), method="sigmoid", cv=group_splits(y, groups, n_folds, seed)
    )
    return calibrated.fit(X, y)


@dataclass
class CrossValidation:
    """Out-of-fold probabilities of a grouped cross-validation and per-fold metrics."""

    probability: np.ndarray  # out-of-fold P(PNEUMONIA) for every training image
    fold: np.ndarray  # the fold each image was held out in

    def summary(self, y: np.ndarray, threshold: float) -> dict[str, float]:
        """Mean and standard deviation over folds of each metric at `threshold`, as `cv_*`."""
        per_fold = [
            binary_metrics(y[self.fold == k], self.probability[self.fold == k], threshold)
            for k in np.unique(self.fold)
        ]
        out = {}
        for name in METRIC_NAMES:
            values = np.array([m[name] for m in per_fold if m[name] is not None], dtype=float)
            out[f"cv_{name}_mean"] = float(values.mean())
            out[f"cv_{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return out


def cross_validate(
    X, y, groups, params: dict | None = None, n_folds: int = 5, seed: int = 0
) -> CrossValidation:
    """Grouped CV of the whole recipe (calibration included, learnt inside each fold)."""
    probability = np.zeros(len(y))
    fold = np.zeros(len(y), dtype=int)
    for k, (train, test) in enumerate(group_splits(y, groups, n_folds, seed)):
        model = fit_calibrated(X[train], y[train], groups[train], params, n_folds, seed)
        probability[test] = model.predict_proba(X[test])[:, 1]
        fold[test] = k
    return CrossValidation(probability, fold)


def choose_threshold(y, probability) -> float:
    """The threshold that maximises sensitivity + specificity (Youden's J) on `probability`.

    Both rates are computed within one class, so they do not move when the class balance does:
    a threshold chosen for them holds on a test set with more (or fewer) NORMAL images than the
    training set, where a threshold tuned for accuracy would follow the training prevalence.
    The cut is placed midway between the best observed score and the next lower one, the
    point with the most room on both sides for the same decisions.
    """
    fpr, tpr, thresholds = roc_curve(y, probability, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if best == 0:  # no threshold separates anything: the scores carry no information
        return 0.5
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else thresholds[best]
    return float((thresholds[best] + lower) / 2)
