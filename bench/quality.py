"""Model quality on real chest X-rays: `hm-mlflow train` with its defaults on ../shared/data/cxr.

Prints grouped cross-validation (mean and spread over folds), the same held-out images reframed
and re-exposed (augmented copies), the `val` split, the training time end to end, and beside it
the template this project replaces (64 x 64 raw pixels + random forest) scored on the same
folds and the same `val` images in the same run.

    .venv/bin/python bench/quality.py [--data ../shared/data/cxr]

Runs against a throwaway SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import mlflow
import numpy as np
from sklearn.ensemble import RandomForestClassifier

from hm_mlflow import modeling
from hm_mlflow.config import Settings
from hm_mlflow.dataset import list_split
from hm_mlflow.metrics import METRIC_NAMES, binary_metrics
from hm_mlflow.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def template_features(path: str) -> np.ndarray:
    """The template's input: the whole film squeezed to 64 x 64 grayscale pixels."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).ravel() / 255.0


def template(data: Path, settings: Settings) -> dict[str, dict]:
    """Grouped CV and val of raw pixels + random forest at its own 0.5 cut, same folds."""
    train_set, val_set = list_split(data, "train"), list_split(data, "val")
    X = np.stack([template_features(s.location) for s in train_set])
    y = np.array([s.label for s in train_set])
    groups = np.array([s.patient for s in train_set])
    forest = lambda: RandomForestClassifier(300, n_jobs=-1, random_state=settings.seed)  # noqa: E731
    oof = np.zeros(len(y))
    for fit, held in modeling.group_splits(y, groups, settings.cv_folds, settings.seed):
        oof[held] = forest().fit(X[fit], y[fit]).predict_proba(X[held])[:, 1]
    Xv = np.stack([template_features(s.location) for s in val_set])
    pv = forest().fit(X, y).predict_proba(Xv)[:, 1]
    yv = np.array([s.label for s in val_set])
    return {"cv": binary_metrics(y, oof, 0.5), "val": binary_metrics(yv, pv, 0.5)}


def model_footprint(uri: str, tmp: str) -> tuple[float, float]:
    """(size in MB of the logged model's files, median seconds to load it as a pyfunc)."""
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=f"{tmp}/footprint"))
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    loads = []
    for _ in range(5):
        started = time.perf_counter()
        mlflow.pyfunc.load_model(uri)
        loads.append(time.perf_counter() - started)
    return size / 1e6, statistics.median(loads)


def row(name: str, values: dict, spread: dict | None = None) -> str:
    cells = []
    for key in METRIC_NAMES:
        value = values.get(key)
        cell = "   -  " if value is None else f"{value:6.3f}"
        if spread is not None:
            cell += f" ± {spread[key]:.3f}"
        cells.append(f"{cell:>14}")
    return f"{name:<34}" + "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not list_split(args.data, "train"):
        raise SystemExit(f"no training images under {args.data}")

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the SQLite store keeps its artifacts beside the working directory
        settings = Settings(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        started = time.perf_counter()
        result = train(args.data, settings, force=True)
        elapsed = time.perf_counter() - started
        baseline = template(args.data, settings)
        size_mb, load_s = model_footprint(f"models:/{settings.model_name}/{result.version}", tmp)

    m = result.metrics
    mean = {k: m[f"cv_{k}_mean"] for k in METRIC_NAMES}
    std = {k: m[f"cv_{k}_std"] for k in METRIC_NAMES}
    print(
        f"\nhm-mlflow train, defaults, on {args.data}: {elapsed:.0f} s end to end "
        f"(features, {settings.cv_folds}-fold grouped CV, final fit, logging, val scoring)"
    )
    print(f"decision threshold {m['threshold']:.3f}")
    print(f"logged model {size_mb:.2f} MB on disk, loaded in {load_s:.2f} s (median of 5)\n")
    print(f"{'':<34}" + "".join(f"{k:>14}" for k in METRIC_NAMES))
    print(row("grouped CV, mean ± sd over folds", mean, std))
    print(row("grouped CV, pooled out-of-fold", {k: m[f"cv_oof_{k}"] for k in METRIC_NAMES}))
    if "cv_augmented_roc_auc" in m:
        print(
            row(
                "held-out images, reframed copies",
                {k: m[f"cv_augmented_{k}"] for k in METRIC_NAMES},
            )
        )
    print(row("val (8 NORMAL + 8 PNEUMONIA)", {k: m.get(f"val_{k}") for k in METRIC_NAMES}))
    print("\nbaseline, same folds and images: 64 x 64 raw pixels + random forest, cut at 0.5")
    print(row("grouped CV, pooled out-of-fold", baseline["cv"]))
    print(row("val (8 NORMAL + 8 PNEUMONIA)", baseline["val"]))


if __name__ == "__main__":
    main()
