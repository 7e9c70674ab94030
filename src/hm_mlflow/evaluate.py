"""Evaluate a logged model on one split of a data set, through its own predict()."""

from __future__ import annotations

import hashlib

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from hm_mlflow.dataset import Sample, require_split
from hm_mlflow.metrics import binary_metrics

BATCH = 32


def predict_samples(
    model: mlflow.pyfunc.PyFuncModel, samples: list[Sample], progress: bool = True
) -> tuple[np.ndarray, str]:
    """P(PNEUMONIA) for each sample, from the model's own preprocessing of the file's bytes,
    and the digest of what was scored (each image's label and content hash, in order)."""
    probabilities, digest = [], hashlib.sha256()
    batches = range(0, len(samples), BATCH)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        batch = samples[start : start + BATCH]
        images = [s.read_bytes() for s in batch]
        for sample, data in zip(batch, images, strict=True):
            digest.update(f"{sample.label_name}:{hashlib.sha256(data).hexdigest()}\n".encode())
        frame = pd.DataFrame({"image": images})
        probabilities.append(model.predict(frame)["probability"].to_numpy(dtype=float))
    scored = np.concatenate(probabilities) if probabilities else np.zeros(0)
    return scored, digest.hexdigest()


def evaluate_model(
    model_uri: str, data_root, split: str, progress: bool = True
) -> dict[str, float | int | str | None]:
    """`binary_metrics` of the model at `model_uri` on `data_root/split`, at its own threshold,
    with the `digest` of the images scored."""
    return evaluate_samples(model_uri, require_split(data_root, split), progress)


def evaluate_samples(
    model_uri: str, samples: list[Sample], progress: bool = True
) -> dict[str, float | int | str | None]:
    """`binary_metrics` of the model at `model_uri` on `samples`, at its own threshold (a
    readers' film at its site's operating point, when the model has one), with the `digest` of
    the images scored."""
    model = mlflow.pyfunc.load_model(model_uri)
    probability, digest = predict_samples(model, samples, progress)
    y = np.array([s.label for s in samples])
    config = model.model_config
    cut = float(config["threshold"])
    own = config.get("site_thresholds") or {}
    cuts = np.array([float(own.get(s.site or "", cut)) for s in samples])
    return {
        **binary_metrics(y, probability, cut if np.all(cuts == cut) else cuts),
        "digest": digest,
    }
