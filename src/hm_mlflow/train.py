"""One training run, end to end, logged to MLflow: the function behind `hm-mlflow train`.

features -> grouped cross-validation -> threshold -> final fit -> logged model -> held-out
evaluation through the logged model -> registered version -> promotion gate.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import mlflow
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from hm_mlflow import augment as augmentation
from hm_mlflow import features, modeling, plots
from hm_mlflow.augment import augment
from hm_mlflow.config import Settings
from hm_mlflow.dataset import (
    Sample,
    is_s3,
    is_synthetic,
    list_split,
    manifest,
    require_split,
    synthetic_info,
)
from hm_mlflow.evaluate import evaluate_model
from hm_mlflow.metrics import METRIC_NAMES, binary_metrics
from hm_mlflow.packaging import log_model
from hm_mlflow.registry import Decision, Registry, decide
from hm_mlflow.synthetic import write_sample_set
from hm_mlflow.tracking import require_server

log = logging.getLogger(__name__)

HOLDOUT_SPLITS = ("val", "test")
_BATCH = 32


@dataclass
class Comparison:
    """The candidate and the version in production, scored on the same held-out images."""

    split: str | None
    candidate: dict | None  # binary_metrics of the new version, None without a held-out split
    incumbent: dict | None  # the same for the Production version, None when there is none
    incumbent_version: str | None = None


@dataclass
class TrainResult:
    run_id: str
    version: str
    decision: Decision
    metrics: dict[str, float] = field(default_factory=dict)
    experiment_id: str | None = None
    comparison: Comparison | None = None


def _extract_batch(
    samples: list[Sample], first: int, copies: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    cv2.setNumThreads(1)  # one process per core already
    vectors, augmented, digests = [], [], []
    for offset, sample in enumerate(samples):
        data = sample.read_bytes()
        vectors.append(features.extract(data))  # exactly what serving computes
        if copies:
            # Copies are cut from a finer decode, so a 45 % crop still has the canvas' detail.
            film = features.load(data, min_side=2 * features.CANVAS)
            rng = np.random.default_rng([seed, first + offset])
            augmented.append([features.from_image(augment(film, rng)) for _ in range(copies)])
        digests.append(hashlib.sha256(data).hexdigest())
    width = len(vectors[0])
    return np.stack(vectors), np.array(augmented).reshape(len(samples), copies, width), digests


def extract_features(
    samples: list[Sample], n_jobs: int, copies: int = 0, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of `samples` (n, d), of `copies` augmented copies of each (copies, n, d) and the
    content hashes, in order, over `n_jobs` processes. Deterministic for a given `seed`."""
    starts = range(0, len(samples), _BATCH)
    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_extract_batch)(samples[i : i + _BATCH], i, copies, seed) for i in starts
    )
    matrices, augmented, digests = [], [], []
    with tqdm(total=len(samples), desc="features", unit="img", disable=not progress) as bar:
        for matrix, copies_matrix, batch_digests in results:
            matrices.append(matrix)
            augmented.append(copies_matrix)
            digests += batch_digests
            bar.update(len(batch_digests))
    X_aug = np.concatenate(augmented).transpose(1, 0, 2)  # (copies, n, d)
    return np.concatenate(matrices), X_aug, digests


def training_data(data: str | None, settings: Settings, sample_if_empty: bool = False) -> str:
    """The data root to train on: `data` or HM_DATA_DIR; with `sample_if_empty`, a synthetic
    sample set (generated once into HM_STATE_DIR/sample) when that root has no train split."""
    data = data or str(settings.data_dir)
    if sample_if_empty and not list_split(data, "train"):
        sample = settings.state_dir / "sample"
        log.warning(
            "no images in %s/train: training on a synthetic sample set in %s "
            "(see source/README.md for the real data set)",
            data,
            sample,
        )
        data = str(write_sample_set(sample, settings.sample_size, settings.seed))
    return data


def gate_split(data_root: str) -> str | None:
    """The split both candidate and Production are judged on: `test`, else `val`."""
    return next((s for s in ("test", "val") if list_split(data_root, s)), None)


@dataclass
class Prepared:
    """The training images of one data root and their features: what every later stage uses."""

    data_root: str
    samples: list[Sample]
    data: modeling.TrainingSet
    digests: list[str]
    synthetic: bool
    params: dict

    @property
    def y(self) -> np.ndarray:
        return self.data.y


@dataclass
class CrossValidated:
    """Grouped cross-validation of the recipe: out-of-fold probabilities, the decision
    threshold chosen on them, and the metrics logged as cv_*."""

    cv: modeling.CrossValidation
    threshold: float
    metrics: dict[str, float]


def prepare(
    data_root: str | Path, settings: Settings, params: dict | None = None, progress: bool = True
) -> Prepared:
    """List `data_root/train` (a folder or an s3:// prefix) and extract the features of every
    image and of its augmented copies (with a progress bar)."""
    data_root = str(data_root)
    samples = require_split(data_root, "train")
    y = np.array([s.label for s in samples])
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"{data_root}/train holds only one class; both NORMAL and PNEUMONIA are needed"
        )
    groups = np.array([s.patient for s in samples])
    X, X_aug, digests = extract_features(
        samples, settings.n_workers, settings.augment_copies, settings.seed, progress
    )
    return Prepared(
        data_root=data_root,
        samples=samples,
        data=modeling.TrainingSet(X, y, groups, X_aug),
        digests=digests,
        synthetic=is_synthetic(data_root),
        params={**modeling.DEFAULT_PARAMS, **(params or {})},
    )


def cross_validate(prepared: Prepared, settings: Settings) -> CrossValidated:
    """Grouped CV of the whole recipe, the threshold and the cv_* metrics; nothing is logged."""
    log.info("cross-validating (%d folds, grouped by patient)", settings.cv_folds)
    y = prepared.y
    cv = modeling.cross_validate(prepared.data, prepared.params, settings.cv_folds, settings.seed)
    threshold = modeling.choose_threshold(y, cv.probability)
    pooled = binary_metrics(y, cv.probability, threshold)
    metrics = {
        "threshold": threshold,
        **cv.summary(y, threshold),
        **{f"cv_oof_{k}": pooled[k] for k in METRIC_NAMES},
    }
    if len(prepared.data.X_aug):  # the same held-out images, reframed and re-exposed
        copies = binary_metrics(np.tile(y, len(cv.augmented)), cv.augmented.ravel(), threshold)
        metrics.update({f"cv_augmented_{k}": copies[k] for k in METRIC_NAMES})
    return CrossValidated(cv, threshold, metrics)


def train(
    data_root: str | Path,
    settings: Settings,
    *,
    force: bool = False,
    promote: bool = True,
    params: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on `data_root/train` (a folder or an s3:// prefix), log the run, register a version
    and run the promotion gate: `prepare`, `cross_validate`, `register` in turn."""
    require_server(settings.tracking_uri)
    prepared = prepare(data_root, settings, params, progress)
    validated = cross_validate(prepared, settings)
    return register(prepared, validated, settings, force=force, promote=promote, progress=progress)


def register(
    prepared: Prepared,
    validated: CrossValidated,
    settings: Settings,
    *,
    force: bool = False,
    promote: bool = True,
    progress: bool = True,
) -> TrainResult:
    """The MLflow run: data manifest, parameters, CV metrics and plots, the final fit logged as
    a model and registered, the held-out splits scored through it, and the promotion gate."""
    require_server(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.set_experiment(settings.experiment)
    data_root, samples, params = prepared.data_root, prepared.samples, prepared.params
    y, X, groups = prepared.y, prepared.data.X, prepared.data.groups
    synthetic = prepared.synthetic
    threshold, metrics = validated.threshold, dict(validated.metrics)

    with mlflow.start_run() as run:
        started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
        table = manifest(samples, data_root, prepared.digests)
        with warnings.catch_warnings():  # MLflow registers the local file source twice
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_pandas(
                table,
                source=data_root if is_s3(data_root) else str(Path(data_root).resolve()),
                name=posixpath.basename(data_root.rstrip("/")),
                targets="label",
            )
        mlflow.log_input(dataset, context="training")
        mlflow.log_table(table, "data/train_manifest.json")
        mlflow.set_tags({"hm.synthetic": str(synthetic).lower(), "hm.data_root": str(data_root)})
        if synthetic:
            mlflow.set_tag("hm.synthetic_generator", str(synthetic_info(data_root)))
        mlflow.log_params(
            {
                **{f"model.{k}": v for k, v in params.items()},
                "model.estimator": "soft vote of 2 balanced logistic regressions (all features; "
                "intensity + HOG), sigmoid-calibrated",
                "augment.copies": settings.augment_copies,
                "augment.crop_area": "-".join(map(str, augmentation.CROP_AREA)),
                "augment.gamma": "-".join(map(str, augmentation.GAMMA)),
                "cv.folds": settings.cv_folds,
                "cv.grouping": "patient",
                "seed": settings.seed,
                "features.version": features.FEATURE_VERSION,
                "features.n": X.shape[1],
                "features.canvas": features.CANVAS,
                "data.n_images": len(samples),
                "data.n_patients": len(set(groups)),
                "data.n_normal": int((y == 0).sum()),
                "data.n_pneumonia": int((y == 1).sum()),
                "data.digest": dataset.digest,
            }
        )
        mlflow.log_figure(
            plots.roc_figure(y, validated.cv.probability, "Cross-validation ROC"),
            "plots/cv_roc.png",
        )
        mlflow.log_figure(
            plots.confusion_figure(y, validated.cv.probability, threshold, "Cross-validation"),
            "plots/cv_confusion.png",
        )

        log.info("fitting the final model on %d images", len(samples))
        estimator = modeling.fit_calibrated(
            prepared.data, params=params, n_folds=settings.cv_folds, seed=settings.seed
        )
        config = {
            "trained_at": started.isoformat(timespec="seconds"),
            "synthetic": synthetic,
            "data_digest": dataset.digest,
            "run_id": run.info.run_id,
        }
        info = log_model(estimator, threshold, config, registered_model_name=settings.model_name)
        version = str(info.registered_model_version)

        # Held-out splits, scored through the logged model: the path serving will take.
        holdout = {}
        for split in HOLDOUT_SPLITS:
            if list_split(data_root, split):
                holdout[split] = evaluate_model(info.model_uri, data_root, split, progress)
                metrics.update(
                    {
                        f"{split}_{k}": v
                        for k, v in holdout[split].items()
                        if k in METRIC_NAMES and v is not None
                    }
                )
        mlflow.log_metrics(metrics)

        registry = Registry(settings.model_name, settings.model_alias)
        comparison = Comparison(split=gate_split(data_root), candidate=None, incumbent=None)
        if promote:
            decision, comparison = _gate(registry, holdout, data_root, settings, force)
        else:
            decision = Decision(False, "promotion not requested (--no-promote)")
        registry.record(version, decision)
        mlflow.set_tags(
            {
                "promotion.decision": "promoted" if decision.promote else "rejected",
                "promotion.reason": decision.reason,
                "registered.version": version,
            }
        )
        log.info(
            "version %s: %s (%s)",
            version,
            "promoted" if decision.promote else "not promoted",
            decision.reason,
        )
        return TrainResult(
            run.info.run_id,
            version,
            decision,
            metrics,
            experiment_id=experiment.experiment_id,
            comparison=comparison,
        )


def _gate(
    registry: Registry, holdout: dict, data_root: str, settings: Settings, force: bool
) -> tuple[Decision, Comparison]:
    """Compare the candidate with the current Production version on the same held-out images;
    the incumbent's figures are logged to the run as `gate_incumbent_*`."""
    split = gate_split(data_root)
    current = registry.production()
    incumbent, error = None, None
    if current is not None and split is not None and not force:
        try:
            incumbent = evaluate_model(
                f"models:/{registry.name}/{current.version}", data_root, split, progress=False
            )
        except Exception as exc:  # an unloadable incumbent must not block a working candidate
            error = f"{type(exc).__name__}: {exc}"
    if incumbent:
        mlflow.log_metrics(
            {
                f"gate_incumbent_{k}": v
                for k, v in incumbent.items()
                if k in METRIC_NAMES and v is not None
            }
        )
    mlflow.set_tags({"gate.split": split or "none", "gate.metric": settings.promotion_metric})
    candidate = holdout.get(split) if split else None
    decision = decide(
        candidate,
        incumbent,
        metric=settings.promotion_metric,
        margin=settings.promotion_margin,
        force=force,
        incumbent_version=current.version if current else None,
        incumbent_error=error,
    )
    return decision, Comparison(split, candidate, incumbent, current.version if current else None)
