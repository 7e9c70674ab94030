"""Figures logged with each training run: ROC curve and confusion matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from hm_mlflow import LABELS


def roc_figure(y, probability, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    RocCurveDisplay.from_predictions(y, probability, ax=ax, name="model", pos_label=1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion_figure(y, probability, threshold: float, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    predicted = (np.asarray(probability) >= threshold).astype(int)
    ConfusionMatrixDisplay.from_predictions(
        y, predicted, labels=[0, 1], display_labels=LABELS, ax=ax, colorbar=False
    )
    ax.set_title(f"{title} (threshold {threshold:.3f})")
    fig.tight_layout()
    return fig


def close(fig: plt.Figure) -> None:
    """Free a figure once it is logged; pyplot keeps every open one alive."""
    plt.close(fig)
