"""One training run, end to end, logged to MLflow: the function behind `hm-mlflow train`.

features -> grouped cross-validation -> threshold -> final fit -> logged model -> held-out
evaluation through the logged model -> registered version -> promotion gate.

With the readers' labels (hm_mlflow.monitoring.feedback, on by default in `hm-mlflow train`),
the labelled films join the training films, each site's held-out films join the gate's
comparison, and a site with at least HM_MIN_SITE_LABELS labelled films gets an operating point
of its own, at which the sensitivity floor holds on that site's films.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import mlflow
import numpy as np

from hm_mlflow import augment as augmentation
from hm_mlflow import features, interrupt, modeling, plots, shifts
from hm_mlflow.config import Settings
from hm_mlflow.dataset import (
    DataError,
    Sample,
    is_s3,
    is_synthetic,
    list_split,
    manifest,
    read_head,
    require_split,
    synthetic_info,
)
from hm_mlflow.evaluate import evaluate_model, evaluate_samples
from hm_mlflow.extraction import extract_features
from hm_mlflow.metrics import METRIC_NAMES, binary_metrics, is_number
from hm_mlflow.monitoring import feedback as readers
from hm_mlflow.monitoring.feedback import EMPTY, FeedbackSet
from hm_mlflow.monitoring.reference import build as build_reference
from hm_mlflow.packaging import log_model, record_checksums
from hm_mlflow.registry import Decision, Registry, decide
from hm_mlflow.shifts import PANEL
from hm_mlflow.synthetic import write_sample_set
from hm_mlflow.tracking import require_server

if TYPE_CHECKING:  # PyTorch is in the train extra only; the annotations need no import
    from hm_mlflow.trunk import Network, TrainedTrunk

log = logging.getLogger(__name__)

HOLDOUT_SPLITS = ("val", "test")


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


MAX_UNREADABLE = 0.02
"""Share of the training images that may be unreadable (skipped, named and counted); above it
the data root is broken and training stops."""


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
    X_shifted: np.ndarray  # (shifts, n, d) the films under the transfer panel
    digests: list[str]
    synthetic: bool
    params: dict
    unreadable: list[str] = field(default_factory=list)  # skipped, named in the run
    feedback: FeedbackSet = EMPTY  # the readers' films: some trained on, the rest held out
    holdout: list[Sample] = field(default_factory=list)  # the held-out readers' films, readable
    X_holdout: np.ndarray | None = None  # their features (as served)
    views: np.ndarray | None = None  # the trunk's inputs (Extracted.views), None without one
    holdout_views: np.ndarray | None = None  # the held-out readers' films' trunk inputs

    @property
    def y(self) -> np.ndarray:
        return self.data.y

    @property
    def y_holdout(self) -> np.ndarray:
        return np.array([s.label for s in self.holdout], dtype=int)


@dataclass
class CrossValidated:
    """Grouped cross-validation of the recipe and the transfer panel: out-of-fold
    probabilities, the operating point chosen on them, the metrics logged as cv_* and
    transfer_*, and the panel's metrics shift by shift."""

    cv: modeling.CrossValidation
    threshold: float
    metrics: dict[str, float]
    per_shift: dict[str, dict] = field(default_factory=dict)  # the transfer panel, by shift


def prepare(
    data_root: str | Path,
    settings: Settings,
    params: dict | None = None,
    progress: bool = True,
    feedback: FeedbackSet | None = None,
) -> Prepared:
    """List `data_root/train` (a folder or an s3:// prefix) and extract the features of every
    image and of its augmented copies (with a progress bar); with `feedback`, of the readers'
    films too (those held out: as served only)."""
    data_root = str(data_root)
    feedback = feedback or EMPTY
    own = require_split(data_root, "train")
    samples = own + feedback.train
    y = np.array([s.label for s in samples])
    if len(np.unique(y)) < 2:
        raise DataError(
            f"{data_root}/train holds only one class; both NORMAL and PNEUMONIA are needed"
        )
    groups = np.array([s.patient for s in samples])
    if settings.trunk:
        require_torch()
    frame_to = shifts.framing_targets(_aspects(samples), y, settings.seed)
    extracted = extract_features(
        samples,
        settings.n_workers,
        settings.augment_copies,
        settings.seed,
        progress,
        frame_to=frame_to,
        trunk=settings.trunk,
    )
    X = extracted.X
    readable = ~np.isnan(X).any(axis=1)
    bad = np.flatnonzero(~readable)
    unreadable = [samples[i].location for i in bad]
    own_unreadable = [samples[i].location for i in bad if i < len(own)]  # not readers' films
    if own_unreadable:
        names = ", ".join(own_unreadable[:5]) + (" ..." if len(own_unreadable) > 5 else "")
        if len(own_unreadable) > MAX_UNREADABLE * len(own):
            raise DataError(
                f"{len(own_unreadable)} of {len(own)} training images cannot be read "
                f"(more than {MAX_UNREADABLE:.0%}): {names}"
            )
    if unreadable:
        names = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        log.warning("skipping %d unreadable training images: %s", len(unreadable), names)
    keep = np.flatnonzero(readable)
    holdout, X_holdout, holdout_views = [], None, None
    if feedback.holdout:
        held = extract_features(
            feedback.holdout, settings.n_workers, progress=False, trunk=settings.trunk
        )
        ok = ~np.isnan(held.X).any(axis=1)
        unreadable += [feedback.holdout[i].location for i in np.flatnonzero(~ok)]
        holdout = [feedback.holdout[i] for i in np.flatnonzero(ok)]
        X_holdout = held.X[ok]
        if held.views is not None:
            holdout_views = held.views[0, ok]
    return Prepared(
        data_root=data_root,
        samples=[samples[i] for i in keep],
        data=modeling.TrainingSet(X[keep], y[keep], groups[keep], extracted.X_aug[:, keep]),
        X_shifted=extracted.X_shifted[:, keep],
        digests=[extracted.digests[i] for i in keep],
        synthetic=is_synthetic(data_root),
        params={**modeling.DEFAULT_PARAMS, **(params or {})},
        unreadable=unreadable,
        feedback=feedback,
        holdout=holdout,
        X_holdout=X_holdout,
        views=None if extracted.views is None else extracted.views[:, keep],
        holdout_views=holdout_views,
    )


def _aspects(samples: list[Sample]) -> np.ndarray:
    """Width / height of each film as stored, from its header (NaN when it cannot be read)."""
    from concurrent.futures import ThreadPoolExecutor

    def aspect(sample: Sample) -> float:
        try:
            width, height = features.image_size(read_head(sample.location))
            return width / height
        except (OSError, ValueError, ZeroDivisionError):
            return float("nan")

    with ThreadPoolExecutor(8) as pool:
        return np.array(list(pool.map(aspect, samples)))


def require_torch() -> None:
    """Stop with what to do when the trunk is asked for and PyTorch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise DataError(
            "training the learned trunk needs PyTorch: install the train extra "
            "(pip install -c constraints.txt -e '.[train]', README: 'The model'), "
            "or set HM_TRUNK=false to train on the hand-made descriptors alone"
        ) from exc


@dataclass
class WithTrunk:
    """A trunk trained on some of the films, and every film's features with its embedding."""

    data: modeling.TrainingSet
    X_shifted: np.ndarray
    trained: TrainedTrunk
    network: Network  # the PyTorch network, for the check against the exported graph


class Embedder(Protocol):
    """What turns trunk inputs (n, side, side) into embeddings (n, width): `features.Trunk`."""

    @property
    def width(self) -> int: ...

    def embed(self, inputs: np.ndarray) -> np.ndarray: ...


def with_trunk(
    prepared: Prepared,
    index: np.ndarray | None,
    settings: Settings,
    progress: bool,
    desc: str,
    shifted: bool = True,
) -> WithTrunk:
    """Train a trunk on the films at `index` (all by default) and their copies, and append its
    embedding to every film's features (`with_embedding`)."""
    from hm_mlflow import trunk

    views, data = prepared.views, prepared.data
    network, trained = trunk.fit(
        views[: 1 + len(data.X_aug)],
        data.y,
        index,
        settings.trunk_epochs,
        settings.seed,
        progress,
        desc,
    )
    # by the exported graph as OpenCV runs it: the model's own code, and four times faster here
    full, X_shifted = with_embedding(prepared, index, features.Trunk(trained.onnx), shifted)
    return WithTrunk(full, X_shifted, trained, network)


def with_embedding(
    prepared: Prepared, index: np.ndarray | None, embedder: Embedder, shifted: bool = True
) -> tuple[modeling.TrainingSet, np.ndarray]:
    """The descriptors of every film and copy and (with `shifted`) panel shift, with the
    embedding of their trunk inputs by `embedder` (`.width`, `.embed(inputs)`: a
    `features.Trunk`) appended, learnt from the films at `index`. A fold's model scores only its
    held-out films under the panel, so the other films' shifted views are not embedded: their
    rows are NaN."""
    views, data = prepared.views, prepared.data
    copies, n = 1 + len(data.X_aug), len(data.y)
    embedded = _embed(embedder, views[:copies])
    columns = np.arange(data.X.shape[1], data.X.shape[1] + embedder.width)
    full = modeling.TrainingSet(
        np.concatenate([data.X, embedded[0]], axis=1),
        data.y,
        data.groups,
        np.concatenate([data.X_aug, embedded[1:]], axis=2),
        embedding=columns,
    )
    X_shifted = prepared.X_shifted
    if shifted:
        held = np.arange(n) if index is None else np.setdiff1d(np.arange(n), index)
        panel = np.full((len(views) - copies, n, embedder.width), np.nan, dtype=np.float32)
        panel[:, held] = _embed(embedder, views[copies:, held])
        X_shifted = np.concatenate([X_shifted, panel], axis=2)
    return full, X_shifted


def _embed(embedder: Embedder, views: np.ndarray, batch: int = 64) -> np.ndarray:
    """The embeddings (views, films, width) of trunk inputs (views, films, side, side)."""
    flat = views.reshape(-1, *views.shape[2:])
    out = [
        embedder.embed(flat[i : i + batch].astype(np.float32)) for i in range(0, len(flat), batch)
    ]
    return np.concatenate(out).reshape(*views.shape[:2], -1)


def cross_validate(prepared: Prepared, settings: Settings, progress: bool = True) -> CrossValidated:
    """Grouped CV of the whole recipe (a trunk trained in each fold when the model has one),
    the transfer estimate, the operating point and the cv_* and transfer_* metrics; nothing is
    logged."""
    log.info("cross-validating (%d folds, grouped by patient)", settings.cv_folds)
    y = prepared.y
    featurise = None
    if prepared.views is not None:  # each fold's trunk is trained on that fold's films only

        def featurise(k: int, train: np.ndarray):
            fold = with_trunk(prepared, train, settings, progress, f"trunk, fold {k + 1}")
            return fold.data, fold.X_shifted

    cv = modeling.cross_validate(
        prepared.data,
        prepared.params,
        settings.cv_folds,
        settings.seed,
        prepared.X_shifted,
        featurise,
    )
    # The last "shift" is the framing-matched view (shifts.framing_targets): an estimate of its
    # own, never part of the panel that places the operating point.
    cv.framed, cv.shifted = cv.shifted[len(PANEL)], cv.shifted[: len(PANEL)]
    # The operating point: the sensitivity floor on the held-out films as they are and under
    # every shift of the panel, pooled (README: "The operating point").
    every = np.concatenate([cv.probability, cv.shifted.ravel()])
    threshold = modeling.choose_threshold(
        np.tile(y, 1 + len(cv.shifted)), every, settings.sensitivity_floor
    )
    pooled = binary_metrics(y, cv.probability, threshold)
    metrics = {
        "threshold": threshold,
        "sensitivity_floor": settings.sensitivity_floor,
        **cv.summary(y, threshold),
        **{f"cv_oof_{k}": pooled[k] for k in METRIC_NAMES},
    }
    if len(prepared.data.X_aug):  # the same held-out images, reframed and re-exposed
        copies = binary_metrics(np.tile(y, len(cv.augmented)), cv.augmented.ravel(), threshold)
        metrics.update({f"cv_augmented_{k}": copies[k] for k in METRIC_NAMES})
    per_shift = {
        name: binary_metrics(y, p, threshold) for name, p in zip(PANEL, cv.shifted, strict=True)
    }
    transfer = binary_metrics(np.tile(y, len(cv.shifted)), cv.shifted.ravel(), threshold)
    metrics.update({f"transfer_{k}": transfer[k] for k in METRIC_NAMES})
    framed = binary_metrics(y, cv.framed, threshold)
    metrics.update({f"framed_{k}": framed[k] for k in METRIC_NAMES})
    for rate in ("sensitivity", "specificity"):
        values = [m[rate] for m in per_shift.values() if m[rate] is not None]
        if values:
            metrics[f"transfer_worst_{rate}"] = min(values)
    return CrossValidated(cv, threshold, metrics, per_shift)


def train(
    data_root: str | Path,
    settings: Settings,
    *,
    force: bool = False,
    promote: bool = True,
    params: dict | None = None,
    progress: bool = True,
    feedback: bool = False,
) -> TrainResult:
    """Train on `data_root/train` (a folder or an s3:// prefix), log the run, register a version
    and run the promotion gate: `prepare`, `cross_validate`, `register` in turn. With
    `feedback`, the readers' labelled films of the prediction log (HM_PREDICTIONS_URI) too."""
    require_server(settings.tracking_uri)
    readers_films = None
    if feedback:
        # A film of the split the gate scores is never trained on, whoever labelled it.
        split = gate_split(str(data_root))
        judged = {
            hashlib.sha256(s.read_bytes()).hexdigest()
            for s in _split_samples(str(data_root), split)
        }
        readers_films = labelled_films(settings).without(judged)
    prepared = prepare(data_root, settings, params, progress, readers_films)
    interrupt.check()
    validated = cross_validate(prepared, settings, progress)
    interrupt.check()
    return register(prepared, validated, settings, force=force, promote=promote, progress=progress)


def labelled_films(settings: Settings) -> FeedbackSet:
    """The readers' labelled films in the prediction log, split by the fixed rule; a log that
    cannot be read stops training (training without them is `--no-feedback`)."""
    from hm_mlflow.monitoring.store import PredictionLog, describe

    try:
        return readers.collect(
            PredictionLog(settings.prediction_log_uri), settings.feedback_holdout
        )
    except Exception as exc:
        raise DataError(
            f"the prediction log at {describe(settings.prediction_log_uri)} cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); train with --no-feedback to "
            "leave the readers' labels out"
        ) from exc


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
    interrupt.check()
    with mlflow.start_run() as run:
        try:
            return _record_run(
                run,
                experiment.experiment_id,
                prepared,
                validated,
                settings,
                force,
                promote,
                progress,
            )
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (hm_mlflow.interrupt): said in MLflow
            mlflow.end_run(status="KILLED")
            raise


def _record_run(
    run,
    experiment_id: str,
    prepared: Prepared,
    validated: CrossValidated,
    settings: Settings,
    force: bool,
    promote: bool,
    progress: bool,
) -> TrainResult:
    """Everything the training run records, in the active run `run`."""
    data_root, samples, params = prepared.data_root, prepared.samples, prepared.params
    y, X, groups = prepared.y, prepared.data.X, prepared.data.groups
    synthetic = prepared.synthetic
    threshold, metrics = validated.threshold, dict(validated.metrics)
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
    if prepared.unreadable:
        mlflow.log_dict({"unreadable": prepared.unreadable}, "data/unreadable.json")
    mlflow.log_dict({"threshold": threshold, "shifts": validated.per_shift}, "transfer/shifts.json")
    readers_films = prepared.feedback
    if readers_films.films:
        held = manifest(prepared.holdout, data_root, [""] * len(prepared.holdout))
        mlflow.log_table(held, "data/feedback_holdout.json")
    mlflow.set_tags({"hm.synthetic": str(synthetic).lower(), "hm.data_root": str(data_root)})
    if synthetic:
        mlflow.set_tag("hm.synthetic_generator", str(synthetic_info(data_root)))
    mlflow.log_params(
        {
            **{f"model.{k}": v for k, v in params.items()},
            "model.estimator": "soft vote of 2 balanced logistic regressions (all features; "
            + ("the trunk's embedding" if prepared.views is not None else "intensity + HOG")
            + "), sigmoid-calibrated",
            "augment.copies": settings.augment_copies,
            "augment.crop_height": "-".join(map(str, augmentation.CROP_HEIGHT)),
            "augment.crop_width": "-".join(map(str, augmentation.CROP_WIDTH)),
            "augment.gamma": "-".join(map(str, augmentation.GAMMA)),
            "augment.processing": "/".join(augmentation.PROCESSING),
            "cv.folds": settings.cv_folds,
            "cv.grouping": "patient",
            "transfer.shifts": ",".join(PANEL),
            "threshold.rule": "highest with sensitivity >= floor on CV + transfer panel; "
            "per site with enough labelled films: the same on the site's films",
            "seed": settings.seed,
            "features.version": features.FEATURE_VERSION,
            "features.n": X.shape[1],
            "features.canvas": features.CANVAS,
            "data.n_images": len(samples),
            "data.n_unreadable": len(prepared.unreadable),
            "data.n_patients": len(set(groups)),
            "data.n_normal": int((y == 0).sum()),
            "data.n_pneumonia": int((y == 1).sum()),
            "data.digest": dataset.digest,
            "feedback.n_train": len(readers_films.train),
            "feedback.n_holdout": len(readers_films.holdout),
            "feedback.not_kept": readers_films.not_kept,
            "feedback.in_gate_split": readers_films.in_split,
            "feedback.sites": ",".join(
                f"{site}:{n['train']}+{n['holdout']}" for site, n in readers_films.sites.items()
            )
            or "none",
            "feedback.rule": readers_films.rule if readers_films.films else "none",
            "feedback.digest": readers_films.digest() if readers_films.films else "none",
        }
    )
    for figure, name in (
        (plots.roc_figure(y, validated.cv.probability, "Cross-validation ROC"), "cv_roc"),
        (
            plots.confusion_figure(y, validated.cv.probability, threshold, "Cross-validation"),
            "cv_confusion",
        ),
    ):
        mlflow.log_figure(figure, f"plots/{name}.png")
        plots.close(figure)

    interrupt.check()
    log.info("fitting the final model on %d images", len(samples))
    data, X_holdout, onnx = prepared.data, prepared.X_holdout, None
    if prepared.views is not None:
        final = with_trunk(prepared, None, settings, progress, "trunk, final", shifted=False)
        data, onnx = final.data, final.trained.onnx
        X_holdout = _log_trunk(final, prepared, X_holdout)
        X = data.X
    estimator = modeling.fit_calibrated(
        data, params=params, n_folds=settings.cv_folds, seed=settings.seed
    )
    site_thresholds, site_metrics = _site_operating_points(
        estimator, prepared, validated, settings, X_holdout
    )
    metrics.update(site_metrics)
    config = {
        "trained_at": started.isoformat(timespec="seconds"),
        "synthetic": synthetic,
        "data_digest": dataset.digest,
        "run_id": run.info.run_id,
        "site_thresholds": site_thresholds,
    }
    # What this version saw: drift in service is measured against it (hm_mlflow.monitoring).
    reference = build_reference(
        X,
        estimator.predict_proba(X)[:, 1],
        y,
        groups,
        np.array([s.site or "" for s in samples]),
        settings.seed,
    )
    info = log_model(
        estimator,
        threshold,
        config,
        registered_model_name=settings.model_name,
        reference=reference,
        trunk=onnx,
    )
    version = str(info.registered_model_version)
    registry = Registry(settings.model_name, settings.model_alias)
    # A model is code the webapp will run: its files' checksums, recorded now, are checked
    # before it is loaded (hm_mlflow.serve.model_holder).
    record_checksums(info.model_uri, settings.model_name, version, registry.client)

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
    interrupt.check()  # a stopped run registers nothing more and promotes nothing

    provenance = {"hm.synthetic": str(synthetic).lower(), "hm.data_root": data_root}
    for key, value in provenance.items():  # on the version too: who replaces whom
        registry.client.set_model_version_tag(settings.model_name, version, key, value)
    comparison = Comparison(split=gate_split(data_root), candidate=None, incumbent=None)
    gate_tags: dict[str, str] = {}
    if promote:
        decision, comparison, gate_tags = gate(
            registry,
            holdout,
            data_root,
            synthetic,
            info.model_uri,
            settings,
            force,
            prepared.holdout,
        )
    else:
        decision = Decision(False, "promotion not requested (--no-promote)")
    registry.record(version, decision, gate_tags)
    mlflow.set_tags(
        {
            "promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.reason": decision.reason,
            "promotion.forced": str(decision.forced).lower(),
            "registered.version": version,
            **gate_tags,
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
        experiment_id=experiment_id,
        comparison=comparison,
    )


def _site_operating_points(
    estimator,
    prepared: Prepared,
    validated: CrossValidated,
    settings: Settings,
    X_holdout: np.ndarray | None,
) -> tuple[dict[str, float], dict[str, float]]:
    """An operating point of its own for each site with at least HM_MIN_SITE_LABELS labelled
    films, both classes among them: the highest threshold that keeps sensitivity at or above
    the floor on the site's films (those held out, scored by this model; those trained on,
    out of fold, as they are and under the transfer panel), pooled, as the global rule does on
    the data root's films. The webapp applies it to that site's films. Returns the thresholds
    and the metrics at them on each site's held-out films (`site_<site>_*`)."""
    sites_trained = np.array([s.site or "" for s in prepared.samples])
    held_sites = np.array([s.site for s in prepared.holdout])
    held_p = estimator.predict_proba(X_holdout)[:, 1] if prepared.holdout else np.zeros(0)
    held_y = prepared.y_holdout
    thresholds: dict[str, float] = {}
    found: dict[str, float] = {}
    for site in sorted({str(s) for s in (*held_sites, *sites_trained) if s}):
        mine, trained = held_sites == site, sites_trained == site
        cv = validated.cv
        y = np.concatenate([held_y[mine], np.tile(prepared.y[trained], 1 + len(cv.shifted))])
        p = np.concatenate([held_p[mine], cv.probability[trained], cv.shifted[:, trained].ravel()])
        labelled = int(mine.sum() + trained.sum())
        found[f"site_{site}_n_holdout"] = int(mine.sum())
        found[f"site_{site}_n_train"] = int(trained.sum())
        if labelled >= settings.min_site_labels and len(np.unique(y)) == 2:
            thresholds[site] = modeling.choose_threshold(y, p, settings.sensitivity_floor)
            found[f"site_{site}_threshold"] = thresholds[site]
        if mine.any():
            cut = thresholds.get(site, validated.threshold)
            scored = binary_metrics(held_y[mine], held_p[mine], cut)
            found.update(
                {f"site_{site}_{k}": scored[k] for k in METRIC_NAMES if scored[k] is not None}
            )
    return thresholds, found


ONNX_TOLERANCE = 1e-3
"""Largest difference allowed between the exported graph run by OpenCV and the PyTorch network
on the same inputs, in embedding values (they agree to about 1e-6)."""


def _log_trunk(final: WithTrunk, prepared: Prepared, X_holdout: np.ndarray | None):
    """Log the final trunk (size, epochs, loss curve, the ONNX file's SHA-256), check that the
    graph OpenCV runs computes what training computed, and return the held-out readers' films'
    features with its embedding."""
    from hm_mlflow import trunk

    trained = final.trained
    sample = prepared.views[0, :64].astype(np.float32)
    served = features.Trunk(trained.onnx).embed(sample)
    difference = float(np.abs(served - trunk.embed(final.network, sample)).max())
    if not difference <= ONNX_TOLERANCE:  # fails closed: NaN too
        raise RuntimeError(
            f"the exported trunk computes embeddings {difference:.2g} away from the trained "
            "network's; the model is not logged"
        )
    mlflow.log_params(
        {
            "trunk.side": features.TRUNK_SIDE,
            "trunk.width": trained.width,
            "trunk.parameters": trained.parameters,
            "trunk.epochs": trained.epochs,
            "trunk.onnx_sha256": trained.sha256,
            "trunk.onnx_bytes": len(trained.onnx),
            "features.n_with_trunk": final.data.X.shape[1],
        }
    )
    for epoch, loss in enumerate(trained.losses):
        mlflow.log_metric("trunk_loss", loss, step=epoch)
    mlflow.log_metrics({"trunk_seconds": trained.seconds, "trunk_onnx_max_diff": difference})
    if X_holdout is None or prepared.holdout_views is None:
        return X_holdout
    embedded = features.Trunk(trained.onnx).embed(prepared.holdout_views.astype(np.float32))
    return np.concatenate([X_holdout, embedded], axis=1)


def _provenance(registry: Registry, version) -> tuple[bool, str | None]:
    """(trained on synthetic images?, its data root) of a registered version: from the version's
    tags, else from its run's."""
    tags = dict(version.tags or {})
    if "hm.synthetic" not in tags and version.run_id:
        try:
            tags = {**registry.client.get_run(version.run_id).data.tags, **tags}
        except Exception:  # the run may be gone; then nothing says it was synthetic
            log.warning("run %s of version %s not found", version.run_id, version.version)
    return tags.get("hm.synthetic") == "true", tags.get("hm.data_root")


def gate(
    registry: Registry,
    holdout: dict,
    data_root: str,
    synthetic: bool,
    candidate_uri: str,
    settings: Settings,
    force: bool,
    sites: list[Sample] | None = None,
) -> tuple[Decision, Comparison, dict[str, str]]:
    """Compare the candidate with the current Production version on the same held-out images,
    failing closed. When the incumbent was trained on real X-rays, the comparison is on real
    held-out images: the candidate's own split if its data is real, else the incumbent's.
    `sites`, the readers' films held out of training, join that split. The incumbent's figures
    are logged to the run as `gate_incumbent_*`; the returned tags (both scores, the split, its
    size and digest) go on the run and the version."""
    metric = settings.promotion_metric
    sites = sites or []
    current = registry.production()
    if current is None:
        split = gate_split(data_root)
        candidate = holdout.get(split) if split else None
        if sites:
            candidate = evaluate_samples(candidate_uri, _split_samples(data_root, split) + sites)
        where = _where(split, data_root, sites)
        decision = decide(candidate, None, metric=metric, margin=0.0, incumbent_version=None)
        tags = _gate_tags(metric, where, candidate, None)
        return decision, Comparison(split, candidate, None), tags

    incumbent_synthetic, incumbent_root = _provenance(registry, current)
    root, split, error = data_root, gate_split(data_root), None
    if not incumbent_synthetic and (synthetic or (split is None and not sites)):
        root = incumbent_root or ""
        try:
            split = gate_split(root) if root else None
        except Exception as exc:  # gone, moved, no credentials: cannot compare on real data
            split, error = None, f"its held-out images at {root} cannot be read: {exc}"
        if split is None and error is None:
            error = f"it names no real held-out images to compare on (data root {root!r})"
    candidate = incumbent = None
    if split is not None or (sites and error is None):
        try:
            films = _split_samples(root, split) + sites
            candidate = holdout.get(split) if root == data_root and not sites else None
            if candidate is None:
                candidate = evaluate_samples(candidate_uri, films, progress=False)
            incumbent = evaluate_samples(
                f"models:/{registry.name}/{current.version}", films, progress=False
            )
        except Exception as exc:  # a transient artifact or S3 error: the gate fails closed
            error = f"{type(exc).__name__}: {exc}"
    if incumbent:
        mlflow.log_metrics(
            {
                f"gate_incumbent_{k}": v
                for k, v in incumbent.items()
                if k in METRIC_NAMES and v is not None
            }
        )
    where = _where(split, root, sites)
    decision = decide(
        candidate,
        incumbent,
        metric=metric,
        margin=settings.promotion_margin,
        force=force,
        incumbent_version=current.version,
        incumbent_error=error,
        candidate_synthetic=synthetic,
        incumbent_synthetic=incumbent_synthetic,
        split=_phrase(split, root, sites),
    )
    tags = {
        **_gate_tags(metric, where, candidate, incumbent),
        "gate.incumbent_version": str(current.version),
    }
    return decision, Comparison(split, candidate, incumbent, str(current.version)), tags


def _split_samples(root: str, split: str | None) -> list[Sample]:
    return list_split(root, split) if split else []


def _sites_text(sites: list[Sample]) -> list[str]:
    names = ", ".join(sorted({s.site for s in sites}))
    return [f"{len(sites)} readers' films held out at {names}"] if sites else []


def _where(split: str | None, root: str, sites: list[Sample]) -> str:
    """The films a gate compared on, for its tags: 'test of ROOT + 25 readers' films ...'."""
    return " + ".join(([f"{split} of {root}"] if split else []) + _sites_text(sites)) or "none"


def _phrase(split: str | None, root: str, sites: list[Sample]) -> str:
    """The same, for the gate's reason: 'the test of ROOT split and 25 readers' films ...'."""
    parts = ([f"the {split} of {root} split"] if split else []) + _sites_text(sites)
    return " and ".join(parts) or "no split"


def _gate_tags(metric: str, where: str, candidate: dict | None, incumbent: dict | None) -> dict:
    """What the gate compared, as tags: the metric, both scores, the split, its size, digest."""
    scored = candidate or incumbent or {}

    def score(scores: dict | None) -> str:
        value = (scores or {}).get(metric)
        return f"{value:.6f}" if is_number(value) else "none"

    return {
        "gate.metric": metric,
        "gate.split": where,
        "gate.split_size": str(scored.get("n", 0)),
        "gate.split_digest": str(scored.get("digest", "")),
        "gate.candidate_score": score(candidate),
        "gate.incumbent_score": score(incumbent),
    }
