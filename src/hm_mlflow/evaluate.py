"""Evaluate a logged model on one split of a data set, through its own predict()."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from hm_mlflow.dataset import Sample, require_split
from hm_mlflow.metrics import binary_metrics

BATCH = 32


def predict_samples(
    model: mlflow.pyfunc.PyFuncModel, samples: list[Sample], progress: bool = True
) -> np.ndarray:
    """P(PNEUMONIA) for each sample, from the model's own preprocessing of the file's bytes."""
    probabilities = []
    batches = range(0, len(samples), BATCH)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        frame = pd.DataFrame({"image": [s.read_bytes() for s in samples[start : start + BATCH]]})
        probabilities.append(model.predict(frame)["probability"].to_numpy(dtype=float))
    return np.concatenate(probabilities) if probabilities else np.zeros(0)


def evaluate_model(
    model_uri: str, data_root, split: str, progress: bool = True
) -> dict[str, float | int | None]:
    """`binary_metrics` of the model at `model_uri` on `data_root/split`, at its own threshold."""
    samples = require_split(data_root, split)
    model = mlflow.pyfunc.load_model(model_uri)
    probability = predict_samples(model, samples, progress)
    y = np.array([s.label for s in samples])
    return binary_metrics(y, probability, float(model.model_config["threshold"]))
