"""95 % intervals for the live metrics: Wilson's for a rate, DeLong's for ROC AUC.

Wilson's score interval keeps its coverage near 95 % for the small counts a site starts with
(20 labelled films), where the plain normal interval is far too narrow and leaves [0, 1].
DeLong's variance of the Mann-Whitney AUC comes from each film's placement among the other
class (DeLong, DeLong and Clarke-Pearson 1988); the interval is normal on the AUC, clipped to
[0, 1].
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

Z95 = 1.959963984540054


def wilson(hits: int, total: int, z: float = Z95) -> dict:
    """{"value", "low", "high", "n"} of the rate hits / total; values None when total is 0."""
    if total == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    p = hits / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return {  # the bounds hold the rate itself whatever the rounding (at 0 or 1 they meet it)
        "value": p,
        "low": min(p, max(0.0, centre - half)),
        "high": max(p, min(1.0, centre + half)),
        "n": total,
    }


def delong_auc(y_true, score, z: float = Z95) -> dict:
    """{"value", "low", "high", "n"} of the ROC AUC; values None without both classes."""
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(score, dtype=float)
    positive, negative = s[y == 1], s[y == 0]
    m, n = len(positive), len(negative)
    if m == 0 or n == 0:
        return {"value": None, "low": None, "high": None, "n": len(y)}
    ranks = rankdata(np.concatenate([positive, negative]))
    # Each positive's share of negatives below it (ties half), and each negative's share of
    # positives above it: the structural components of the AUC.
    v10 = (ranks[:m] - rankdata(positive)) / n
    v01 = 1.0 - (ranks[m:] - rankdata(negative)) / m
    auc = float(v10.mean())
    variance = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    half = z * math.sqrt(max(variance, 0.0))
    return {"value": auc, "low": max(0.0, auc - half), "high": min(1.0, auc + half), "n": len(y)}


def performance(y_true, probability, threshold) -> dict:
    """Sensitivity, specificity, accuracy (Wilson) and ROC AUC (DeLong) of labelled films,
    each with its interval and count; `threshold` may vary film by film (versions differ)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probability, dtype=float)
    called = p >= np.asarray(threshold, dtype=float)
    tp = int(np.sum(called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    return {
        "n": len(y),
        "pneumonia": int(np.sum(y == 1)),
        "normal": int(np.sum(y == 0)),
        "sensitivity": wilson(tp, int(np.sum(y == 1))),
        "specificity": wilson(tn, int(np.sum(y == 0))),
        "accuracy": wilson(tp + tn, len(y)),
        "roc_auc": delong_auc(y, p),
    }
