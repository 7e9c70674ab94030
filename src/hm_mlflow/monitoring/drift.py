"""Has a site's traffic moved away from what the serving version was trained on?

Two tests, as the literature on detecting shift in images recommends (Rabanser, Günnemann and
Lipton, "Failing Loudly", NeurIPS 2019: a domain classifier on reduced features, and univariate
tests on the model's outputs, which they found the most reliable):

- **Input drift**: a domain classifier. Can the site's recent films be told apart from the
  training films by their feature summaries (hm_mlflow.monitoring.reference)? A linear
  discriminant on the standardised summaries and their squares (so a change of spread shows too),
  fitted by ridge regression, scored out of fold over 5 folds; the score is its ROC AUC (0.5:
  indistinguishable). The threshold is the (1 - alpha) quantile of the same AUC under 199
  random relabellings (a permutation test: it adapts to how many films there are), and never
  below HM_DRIFT_MIN_AUC, so a large site is not flagged for a difference too small to matter.
  Ridge regression has a closed form, so the folds' systems are solved once for all relabellings
  together: a test costs milliseconds where refitting a classifier 1,000 times would cost
  seconds.
- **Score drift**: the two-sample Kolmogorov-Smirnov test between the site's probabilities and
  the training films' out-of-fold probabilities. Its threshold is the statistic's critical value
  at alpha for these sizes, and never below 0.1. A site whose case mix differs from training
  (more NORMAL films) moves this one without any change in the films: the verdict says so.

No drift library is used: Evidently's embedding drift uses the same domain classifier but
resamples only the reference for its threshold (which over-flags), Alibi Detect is under the
Business Source License, and the rest is a few lines of NumPy and SciPy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import ks_2samp, rankdata

PERMUTATIONS = 199
FOLDS = 5
MAX_REFERENCE = 1000
RIDGE = 100.0
MIN_KS = 0.1

DRIFT, NO_DRIFT, TOO_FEW, NO_REFERENCE = "drift", "no drift", "too few films", "no reference"


@dataclass(frozen=True)
class DriftTest:
    method: str
    verdict: str  # drift, no drift, too few films, no reference
    films: int
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None

    @property
    def drifting(self) -> bool:
        return self.verdict == DRIFT

    def as_dict(self) -> dict:
        return asdict(self)


def _expand(rows: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (rows - mean) / scale
    return np.column_stack([np.ones(len(z)), z, z * z - 1.0])


def _auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of `scores` (n, b) against the matching column of `labels`."""
    ranks = np.apply_along_axis(rankdata, 0, scores)
    positives = labels.sum(axis=0)
    negatives = len(labels) - positives
    rank_sum = (ranks * labels).sum(axis=0)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def domain_auc(
    reference: np.ndarray,
    recent: np.ndarray,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Out-of-fold AUC of a ridge discriminant telling `recent` rows from `reference` rows,
    and the same AUC under `permutations` random relabellings of the pooled rows."""
    rng = np.random.default_rng(seed)
    if len(reference) > MAX_REFERENCE:
        reference = reference[rng.choice(len(reference), MAX_REFERENCE, replace=False)]
    pooled = np.vstack([reference, recent]).astype(np.float64)
    mean = reference.mean(axis=0)
    scale = reference.std(axis=0)
    scale[scale < 1e-9] = 1.0
    X = _expand(pooled, mean, scale)
    n = len(X)
    observed = np.r_[np.zeros(len(reference)), np.ones(len(recent))]
    labels = np.column_stack(
        [observed] + [rng.permutation(observed) for _ in range(permutations)]
    )  # (n, 1 + permutations)
    folds = rng.permutation(n) % FOLDS
    scores = np.zeros_like(labels)
    penalty = RIDGE * np.eye(X.shape[1])
    penalty[0, 0] = 0.0  # no penalty on the intercept
    targets = labels - labels.mean(axis=0)
    for k in range(FOLDS):
        train, test = folds != k, folds == k
        Xt = X[train]
        weights = np.linalg.solve(Xt.T @ Xt + penalty, Xt.T @ targets[train])
        scores[test] = X[test] @ weights
    aucs = _auc(labels, scores)
    return float(aucs[0]), aucs[1:]


def input_drift(
    reference: np.ndarray | None,
    recent: np.ndarray,
    *,
    alpha: float,
    min_auc: float,
    min_films: int,
    seed: int = 0,
) -> DriftTest:
    method = "domain classifier (ridge on feature summaries), out-of-fold ROC AUC"
    films = len(recent)
    if reference is None or not len(reference):
        return DriftTest(method, NO_REFERENCE, films)
    if films < min_films:
        return DriftTest(method, TOO_FEW, films)
    if recent.shape[1] != reference.shape[1]:
        return DriftTest(method, NO_REFERENCE, films)
    score, null = domain_auc(reference, recent, seed=seed)
    threshold = max(float(np.quantile(null, 1 - alpha)), min_auc)
    p_value = float((1 + np.sum(null >= score)) / (1 + len(null)))
    verdict = DRIFT if score > threshold else NO_DRIFT
    return DriftTest(method, verdict, films, score, threshold, p_value)


def score_drift(
    reference: np.ndarray | None,
    recent: np.ndarray,
    *,
    alpha: float,
    min_films: int,
) -> DriftTest:
    method = "Kolmogorov-Smirnov on P(PNEUMONIA) against the training films' out-of-fold scores"
    films = len(recent)
    if reference is None or not len(reference):
        return DriftTest(method, NO_REFERENCE, films)
    if films < min_films:
        return DriftTest(method, TOO_FEW, films)
    result = ks_2samp(np.asarray(reference, float), np.asarray(recent, float))
    n, m = len(reference), films
    critical = math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))
    threshold = max(critical, MIN_KS)
    verdict = DRIFT if result.statistic > threshold else NO_DRIFT
    return DriftTest(
        method, verdict, films, float(result.statistic), threshold, float(result.pvalue)
    )
