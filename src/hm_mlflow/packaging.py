"""Log a fitted estimator as a self-contained MLflow model that takes image bytes."""

from __future__ import annotations

import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from hm_mlflow import LABELS, features
from hm_mlflow.monitoring.reference import Reference
from hm_mlflow.monitoring.reference import save as save_reference
from hm_mlflow.synthetic import make_film

MODEL_CODE = Path(__file__).with_name("model_code.py")
FEATURES_CODE = Path(features.__file__)
# What a model needs to predict, pinned to the versions it was trained with.
RUNTIME_PACKAGES = (
    "mlflow-skinny",
    "numpy",
    "opencv-python-headless",
    "pandas",
    "pillow",
    "scikit-learn",
    "skops",
)


def signature(threshold: float) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
        params=ParamSchema(
            [ParamSpec("threshold", "double", threshold), ParamSpec("site", "string", "")]
        ),
    )


def input_example() -> pd.DataFrame:
    """A small synthetic film: shows the input format without shipping patient data."""
    film = cv2.imdecode(
        np.frombuffer(make_film(seed=7, pneumonia=True), np.uint8), cv2.IMREAD_GRAYSCALE
    )
    scale = features.CANVAS / min(film.shape)
    small = cv2.resize(film, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return pd.DataFrame({"image": [cv2.imencode(".png", small)[1].tobytes()]})


def log_model(
    estimator,
    threshold: float,
    config: dict,
    registered_model_name: str | None = None,
    reference: Reference | None = None,
    trunk: bytes | None = None,
) -> ModelInfo:
    """Log `estimator` with this package's features.py and model code, in the active run.

    `config` (training date, data digest, synthetic flag, ...) is stored in the model beside the
    threshold and labels, so whoever serves the model can show where it came from. `reference`
    (the training films' summaries, hm_mlflow.monitoring.reference) goes with it for drift;
    `trunk` (an ONNX graph, hm_mlflow.trunk) is the learned representation the features append.
    """
    import skops.io  # seconds to import (it lists scikit-learn's types): imported here only

    with tempfile.TemporaryDirectory() as tmp:
        estimator_path = Path(tmp) / "estimator.skops"
        skops.io.dump(estimator, estimator_path, compression=zipfile.ZIP_DEFLATED)
        artifacts = {"features": str(FEATURES_CODE), "estimator": str(estimator_path)}
        if reference is not None:
            artifacts["reference"] = str(save_reference(reference, Path(tmp) / "reference.npz"))
        if trunk is not None:
            (Path(tmp) / "trunk.onnx").write_bytes(trunk)
            artifacts["trunk"] = str(Path(tmp) / "trunk.onnx")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            model_config={
                **config,
                "threshold": float(threshold),
                "labels": list(LABELS),
                "feature_version": features.FEATURE_VERSION,
            },
            signature=signature(threshold),
            input_example=input_example(),
            pip_requirements=[f"{name}=={version(name)}" for name in RUNTIME_PACKAGES],
            registered_model_name=registered_model_name,
        )


CHECKSUMS_TAG = "hm.model_files"
"""Version tag holding the SHA-256 of every file of the logged model, recorded at registration."""
_NOT_STORED = {"registered_model_meta"}  # written by MLflow's downloader (name and version)


def file_checksums(directory: str | Path) -> dict[str, str]:
    """SHA-256 of every file of a downloaded model, by path relative to it."""
    import hashlib

    root = Path(directory)
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in _NOT_STORED
    }


def checksum_mismatches(directory: str | Path, recorded: dict[str, str]) -> list[str]:
    """Files that differ from, or are missing from, or were added to what was recorded."""
    found = file_checksums(directory)
    changed = [name for name, digest in recorded.items() if found.get(name) != digest]
    added = [name for name in found if name not in recorded]
    return sorted(changed + added)


def recorded_checksums(version) -> dict[str, str] | None:
    """The checksums a registered version was tagged with at registration, or None."""
    import json

    raw = (version.tags or {}).get(CHECKSUMS_TAG)
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def record_checksums(model_uri: str, name: str, version: str, client) -> dict[str, str]:
    """Hash the files of the logged model at `model_uri` as stored, and tag the registered
    version with them: what the webapp checks before it runs a version's code."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        checksums = file_checksums(local)
    client.set_model_version_tag(name, version, CHECKSUMS_TAG, json.dumps(checksums))
    return checksums
