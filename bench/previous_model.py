"""The previous model's figures, computed in the same run as the current one's.

Run by bench/quality.py in a child process whose `hm_mlflow` is the package as it was at an
earlier commit (`--src`, extracted with `git archive`): its features, augmentation, estimator and
threshold rule, scored on the same folds, the same transfer panel (this checkout's
`hm_mlflow/shifts.py`, loaded by path) and the same `val` films. Prints one JSON object.

    python bench/previous_model.py --src /tmp/old/src --panel src/hm_mlflow/shifts.py --data DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    parser.add_argument("--panel", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.src)
    import cv2

    from hm_mlflow import features, modeling
    from hm_mlflow.config import Settings
    from hm_mlflow.dataset import list_split
    from hm_mlflow.metrics import binary_metrics
    from hm_mlflow.train import extract_features

    spec = importlib.util.spec_from_file_location("panel", args.panel)
    panel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(panel)

    settings = Settings()
    samples = list_split(args.data, "train")
    y = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    X, X_aug, _ = extract_features(
        samples, settings.n_workers, settings.augment_copies, settings.seed, progress=False
    )
    shifted = np.zeros((len(panel.PANEL), *X.shape), dtype=np.float32)
    cv2.setNumThreads(1)
    for i, sample in enumerate(samples):
        film = features.load(sample.read_bytes(), min_side=2 * features.CANVAS)
        for k, shift in enumerate(panel.PANEL.values()):
            shifted[k, i] = features.from_image(features.crop_to_content(shift(film)))

    data = modeling.TrainingSet(X, y, groups, X_aug)
    oof, on_shifts = np.zeros(len(y)), np.zeros((len(panel.PANEL), len(y)))
    for train, test in modeling.group_splits(y, groups, settings.cv_folds, settings.seed):
        model = modeling.fit_calibrated(data, train, None, settings.cv_folds, settings.seed)
        oof[test] = model.predict_proba(X[test])[:, 1]
        for k in range(len(shifted)):
            on_shifts[k, test] = model.predict_proba(shifted[k, test])[:, 1]
    if len(inspect.signature(modeling.choose_threshold).parameters) == 2:
        threshold = modeling.choose_threshold(y, oof)  # its own rule (Youden's J on CV)
    else:
        every = np.concatenate([oof, on_shifts.ravel()])
        threshold = modeling.choose_threshold(
            np.tile(y, 1 + len(shifted)), every, settings.sensitivity_floor
        )
    final = modeling.fit_calibrated(data, None, None, settings.cv_folds, settings.seed)
    val = list_split(args.data, "val")
    Xv = np.stack([features.extract(s.read_bytes()) for s in val])
    per_shift = {
        name: binary_metrics(y, p, threshold)
        for name, p in zip(panel.PANEL, on_shifts, strict=True)
    }
    print(
        json.dumps(
            {
                "feature_version": features.FEATURE_VERSION,
                "threshold": threshold,
                "cv": binary_metrics(y, oof, threshold),
                "transfer": binary_metrics(np.tile(y, len(shifted)), on_shifts.ravel(), threshold),
                "shifts": per_shift,
                "val": binary_metrics(
                    np.array([s.label for s in val]), final.predict_proba(Xv)[:, 1], threshold
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
