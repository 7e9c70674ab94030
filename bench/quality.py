"""Model quality on real chest X-rays: `hm-mlflow train` with its defaults on ../shared/data/cxr,
the old model and the new one, under the old validation and the new, from one run.

- old model: HM_TRUNK=false, the hand-made descriptors alone (the previous round's recipe);
  new model: the defaults, descriptors and the learned trunk's embedding (hm_mlflow.trunk).
- old validation: grouped cross-validation and the transfer estimate (the same held-out films
  under the hand-chosen panel of acquisition shifts, pooled and shift by shift); new
  validation: the framing-matched estimate (held-out NORMAL films reframed to the PNEUMONIA
  films' own aspect ratios, shifts.framing_targets). Beside them, the old model's figures on
  the hidden test split, measured from outside: what the validations should have foreseen.
- the training time of each end to end, the logged model's size and load time, and the
  template this project replaces (64 x 64 raw pixels + random forest) on the same folds.

    .venv/bin/python bench/quality.py [--data ../shared/data/cxr]

Runs against a throwaway SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


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


HIDDEN_OLD = {"accuracy": 0.875, "roc_auc": 0.961, "sensitivity": 0.979, "specificity": 0.701}
"""The old model (feature version 4, no trunk) scored from outside on the hidden test split
(624 films of other patients, issue 20): what a validation should have foreseen."""


def validations(m: dict) -> list[tuple[str, dict]]:
    """The estimates of one training run, old validation first."""
    return [
        ("grouped CV, pooled out-of-fold", {k: m[f"cv_oof_{k}"] for k in METRIC_NAMES}),
        ("old: transfer estimate, pooled", {k: m[f"transfer_{k}"] for k in METRIC_NAMES}),
        ("new: framing-matched estimate", {k: m[f"framed_{k}"] for k in METRIC_NAMES}),
        ("val (8 NORMAL + 8 PNEUMONIA)", {k: m.get(f"val_{k}") for k in METRIC_NAMES}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the MLflow store (models `old` and `new`) in this folder, for bench/latency.py",
    )
    args = parser.parse_args()
    if not list_split(args.data, "train"):
        raise SystemExit(f"no training images under {args.data}")
    data = args.data.resolve()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep.resolve())
        os.chdir(tmp)  # the SQLite store keeps its artifacts beside the working directory
        for name, trunk in (("old model (descriptors, no trunk)", False), ("new model", True)):
            settings = Settings(
                MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
                model_name="old" if not trunk else "new",
                trunk=trunk,
            )
            started = time.perf_counter()
            result = train(data, settings, force=True)
            elapsed = time.perf_counter() - started
            client = mlflow.MlflowClient(settings.tracking_uri)
            shifts = json.loads(
                Path(
                    client.download_artifacts(result.run_id, "transfer/shifts.json", tmp)
                ).read_text()
            )["shifts"]
            uri = f"models:/{settings.model_name}/{result.version}"
            runs[name] = (result, elapsed, shifts, *model_footprint(uri, f"{tmp}/{trunk}"))
        baseline = template(data, settings)

    print(f"\nhm-mlflow train on {data}, defaults ({settings.cv_folds}-fold grouped CV)")
    for name, (result, elapsed, _, size_mb, load_s) in runs.items():
        m = result.metrics
        print(
            f"{name}: {elapsed:.0f} s end to end, operating point {m['threshold']:.3f}, "
            f"logged model {size_mb:.2f} MB, loaded in {load_s:.2f} s (median of 5)"
        )
    print(f"\n{'':<38}" + "".join(f"{k:>14}" for k in METRIC_NAMES))
    print(row("old model on the hidden test split", HIDDEN_OLD))
    for name, (result, *_) in runs.items():
        print(name)
        for label, values in validations(result.metrics):
            print(row(f"  {label}", values))
    old_shifts, new_shifts = (runs[name][2] for name in runs)
    print("\ntransfer panel, shift by shift: sensitivity / specificity (old -> new)")
    for name, now in new_shifts.items():
        before = old_shifts[name]
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
