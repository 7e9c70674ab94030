"""Model quality on real chest X-rays: `hm-mlflow train` with its defaults on ../shared/data/cxr.

Prints grouped cross-validation (mean and spread over folds), the transfer estimate (the same
held-out films under the panel of acquisition shifts, pooled and shift by shift), the `val`
split and the training time end to end. Beside them, in the same run: the previous model (the
package as it was at `--previous`, by bench/previous_model.py, on the same folds, panel and
`val` films) and the template this project replaces (64 x 64 raw pixels + random forest).

    .venv/bin/python bench/quality.py [--data ../shared/data/cxr] [--previous 5b8238b]

Runs against a throwaway SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"
PREVIOUS = "5b8238b"
"""The last commit before the transfer work (feature version 3, Youden's J on CV)."""


def previous_model(ref: str, data: Path, tmp: str) -> dict:
    """The figures of the package as it was at `ref`, from a child process running its code."""
    old = Path(tmp) / "previous"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    answer = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "previous_model.py"),
            "--src",
            str(old / "src"),
            "--panel",
            str(ROOT / "src" / "hm_mlflow" / "shifts.py"),
            "--data",
            str(data),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(old / "src")},
    )
    return json.loads(answer.stdout.strip().splitlines()[-1])


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
    return f"{name:<38}" + "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--previous", default=PREVIOUS, help="git ref of the previous model")
    args = parser.parse_args()
    if not list_split(args.data, "train"):
        raise SystemExit(f"no training images under {args.data}")
    data = args.data.resolve()

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the SQLite store keeps its artifacts beside the working directory
        settings = Settings(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        started = time.perf_counter()
        result = train(data, settings, force=True)
        elapsed = time.perf_counter() - started
        client = mlflow.MlflowClient(settings.tracking_uri)
        shifts = json.loads(
            Path(client.download_artifacts(result.run_id, "transfer/shifts.json", tmp)).read_text()
        )["shifts"]
        size_mb, load_s = model_footprint(f"models:/{settings.model_name}/{result.version}", tmp)
        previous = previous_model(args.previous, data, tmp)
        baseline = template(data, settings)

    m = result.metrics
    mean = {k: m[f"cv_{k}_mean"] for k in METRIC_NAMES}
    std = {k: m[f"cv_{k}_std"] for k in METRIC_NAMES}
    print(
        f"\nhm-mlflow train, defaults, on {data}: {elapsed:.0f} s end to end "
        f"(features and transfer panel, {settings.cv_folds}-fold grouped CV, final fit, "
        "logging, val scoring)"
    )
    print(
        f"operating point {m['threshold']:.3f}: the highest threshold with sensitivity >= "
        f"{settings.sensitivity_floor} on the held-out films and the transfer panel, pooled"
    )
    print(f"logged model {size_mb:.2f} MB on disk, loaded in {load_s:.2f} s (median of 5)\n")
    print(f"{'':<38}" + "".join(f"{k:>14}" for k in METRIC_NAMES))
    print(row("grouped CV, mean ± sd over folds", mean, std))
    print(row("grouped CV, pooled out-of-fold", {k: m[f"cv_oof_{k}"] for k in METRIC_NAMES}))
    print(row("transfer estimate, pooled", {k: m[f"transfer_{k}"] for k in METRIC_NAMES}))
    print(row("val (8 NORMAL + 8 PNEUMONIA)", {k: m.get(f"val_{k}") for k in METRIC_NAMES}))
    print(
        f"\nprevious model ({args.previous}, feature version {previous['feature_version']}, "
        f"its own threshold rule: {previous['threshold']:.3f}), same folds, panel and films"
    )
    print(row("grouped CV, pooled out-of-fold", previous["cv"]))
    print(row("transfer estimate, pooled", previous["transfer"]))
    print(row("val (8 NORMAL + 8 PNEUMONIA)", previous["val"]))
    print("\ntransfer panel, shift by shift: sensitivity / specificity (previous -> now)")
    for name, now in shifts.items():
        before = previous["shifts"][name]
        print(
            f"  {name:<12} sens {before['sensitivity']:.3f} -> {now['sensitivity']:.3f}   "
            f"spec {before['specificity']:.3f} -> {now['specificity']:.3f}   "
            f"AUC {before['roc_auc']:.3f} -> {now['roc_auc']:.3f}"
        )
    print("\nbaseline, same folds and images: 64 x 64 raw pixels + random forest, cut at 0.5")
    print(row("grouped CV, pooled out-of-fold", baseline["cv"]))
    print(row("val (8 NORMAL + 8 PNEUMONIA)", baseline["val"]))


if __name__ == "__main__":
    main()
