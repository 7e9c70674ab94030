"""The estimator, patient-grouped cross-validation, calibration and the decision threshold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from hm_mlflow.features import group_columns
from hm_mlflow.metrics import METRIC_NAMES, binary_metrics

DEFAULT_PARAMS = {"C": 0.01}


@dataclass
class TrainingSet:
    """Feature vectors of the training images and of their augmented copies.

    `X_aug[k, i]` is copy k of image i: same label, same patient, never on the other side of a
    split from its original.
    """

    X: np.ndarray  # (n, features)
    y: np.ndarray  # (n,) 0 NORMAL, 1 PNEUMONIA
    groups: np.ndarray  # (n,) patient of each image
    X_aug: np.ndarray  # (copies, n, features); copies may be 0
    embedding: np.ndarray | None = None  # columns of the trunk's embedding, if there is one

    def rows(self, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, groups) of the images at `index` (all by default) and of their copies."""
        index = np.arange(len(self.y)) if index is None else index
        X = np.concatenate([self.X[index], *self.X_aug[:, index]])
        reps = 1 + len(self.X_aug)
        return X, np.tile(self.y[index], reps), np.tile(self.groups[index], reps)


def _logistic(C: float) -> list[tuple]:
    return [
        ("scale", StandardScaler()),
        ("classify", LogisticRegression(C=C, class_weight="balanced", max_iter=5000)),
    ]


def _select(columns: np.ndarray) -> tuple[str, FunctionTransformer]:
    # Column selection as np.take over an index array: skops stores it as one binary block,
    # where a ColumnTransformer keeps its indices as Python lists (about 10 MB of JSON per model).
    return ("select", FunctionTransformer(np.take, kw_args={"indices": columns, "axis": 1}))


def build_estimator(params: dict | None = None, embedding: np.ndarray | None = None):
    """L2 logistic regressions with balanced class weights, their probabilities averaged: one on
    every feature, one on the anatomy alone (intensity layout and HOG, steadier than the texture
    groups on films processed unlike the training set) and, with a learned trunk (`embedding`:
    the columns of its embedding, after the descriptors), one on the embedding alone.

    The hand-made descriptors carry the texture of the lung fields, but they also read how a
    film was framed (bench/quality.py, transfer panel: a NORMAL film collimated as tightly as
    the PNEUMONIA ones looks like pneumonia to them); the network, trained on reframed copies,
    is steadier there, and its own view gives it a vote of its own. Measured on the shared
    films (8-epoch trunk, 3 folds): the three voters rank `val` at ROC AUC 0.953 where the
    embedding's vote beside "all" alone gave 0.859.
    """
    C = {**DEFAULT_PARAMS, **(params or {})}["C"]
    voters = [
        ("all", Pipeline(_logistic(C))),
        ("anatomy", Pipeline([_select(group_columns("intensity", "hog")), *_logistic(C)])),
    ]
    if embedding is not None and len(embedding):
        voters.append(("learned", Pipeline([_select(np.asarray(embedding)), *_logistic(C)])))
    return VotingClassifier(voters, voting="soft")


def group_splits(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list:
    """Stratified folds in which each patient's images stay together."""
    n_folds = min(n_folds, len(np.unique(groups)))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def fit_calibrated(
    data: TrainingSet,
    index: np.ndarray | None = None,
    params: dict | None = None,
    n_folds: int = 5,
    seed: int = 0,
) -> ClassifierMixin:
    """Fit on the images at `index` and their copies, with sigmoid calibration learnt on
    patient-grouped folds."""
    X, y, groups = data.rows(index)
    calibrated = CalibratedClassifierCV(
        build_estimator(params, data.embedding),
        method="sigmoid",
        cv=group_splits(y, groups, n_folds, seed),
    )
    return calibrated.fit(X, y)


@dataclass
class CrossValidation:
    """Out-of-fold probabilities of a grouped cross-validation."""

    probability: np.ndarray  # (n,) P(PNEUMONIA) of each image, from the fold that held it out
    augmented: np.ndarray  # (copies, n) the same for each augmented copy
    fold: np.ndarray  # (n,) the fold each image was held out in
    shifted: np.ndarray | None = None  # (shifts, n) the same under each transfer shift
    framed: np.ndarray | None = None  # (n,) the same, NORMAL films framed as PNEUMONIA ones

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
    data: TrainingSet,
    params: dict | None = None,
    n_folds: int = 5,
    seed: int = 0,
    X_shifted: np.ndarray | None = None,
    featurise: Callable[[int, np.ndarray], tuple[TrainingSet, np.ndarray | None]] | None = None,
) -> CrossValidation:
    """Grouped CV of the whole recipe: augmentation and calibration learnt inside each fold.
    `X_shifted` (shifts, n, features), the training films under the transfer panel, is scored
    by the same fold models: each film only by the model that never saw it. `featurise(k,
    train)`, when given, is the features of fold k (a learned trunk trained on the films at
    `train` only): the (TrainingSet, X_shifted) that fold's model is fitted on and scores."""
    n = len(data.y)
    probability, fold = np.zeros(n), np.zeros(n, dtype=int)
    augmented = np.zeros((len(data.X_aug), n))
    shifted = None if X_shifted is None else np.zeros((len(X_shifted), n))
    for k, (train, test) in enumerate(group_splits(data.y, data.groups, n_folds, seed)):
        if featurise is not None:
            data_k, X_shifted = featurise(k, train)
        else:
            data_k = data
        model = fit_calibrated(data_k, train, params, n_folds, seed)
        probability[test] = model.predict_proba(data_k.X[test])[:, 1]
        for copy in range(len(data.X_aug)):
            augmented[copy, test] = model.predict_proba(data_k.X_aug[copy, test])[:, 1]
        if shifted is not None:
            for index in range(len(X_shifted)):
                shifted[index, test] = model.predict_proba(X_shifted[index, test])[:, 1]
        fold[test] = k
    return CrossValidation(probability, augmented, fold, shifted)


def choose_threshold(y, probability, sensitivity_floor: float) -> float:
    """The highest threshold whose sensitivity on `probability` is at least the floor (the
    share of PNEUMONIA films the operating point must catch, `HM_SENSITIVITY_FLOOR`).

    A screening reader's first requirement is a stated share of pneumonias caught; among the
    cuts that meet it, the highest flags the fewest NORMAL films. Training passes the pooled
    out-of-fold probabilities of the held-out films as they are and under every shift of the
    transfer panel (`hm_mlflow.shifts`), so the floor holds on films processed unlike the
    training set. Sensitivity is computed within one class: the cut does not follow the class
    balance. It is placed midway between the lowest score kept and the next lower one, the
    point with the most room on both sides for the same decisions.
    """
    _, tpr, thresholds = roc_curve(y, probability, drop_intermediate=False)
    if len(thresholds) < 3:  # one score for every image: nothing separates anything
        return 0.5
    meets = int(np.argmax(tpr >= sensitivity_floor - 1e-12))
    lower = thresholds[meets + 1] if meets + 1 < len(thresholds) else thresholds[meets] / 2
    return float((thresholds[meets] + lower) / 2)
