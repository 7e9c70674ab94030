"""The bundled model: its files match its record, its record matches the shared data (when
../shared is here), it predicts the shared `val` films as recorded, and it registers into an
empty registry as a promoted, tagged, checksummed version."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from hm_mlflow.bundle import BUNDLE, BundleError, load_record, register, train_files_digest
from hm_mlflow.dataset import list_split
from hm_mlflow.metrics import METRIC_NAMES, binary_metrics
from hm_mlflow.packaging import CHECKSUMS_TAG

from support import make_settings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/cxr is not here")


def test_the_bundle_is_small_and_matches_its_record():
    record = load_record()
    size = sum(f.stat().st_size for f in (BUNDLE / "model").rglob("*") if f.is_file())
    assert size < 10 * 2**20
    assert (BUNDLE / "ATTRIBUTION.md").read_text().count("CC BY 4.0") >= 1
    assert record["data"]["n_images"] == 1580
    for name in ("cv_oof_roc_auc", "transfer_roc_auc", "val_roc_auc", "threshold"):
        assert 0 < record["metrics"][name] <= 1


def test_a_changed_file_is_refused(tmp_path):
    copy = tmp_path / "bundled"
    shutil.copytree(BUNDLE, copy)
    estimator = next((copy / "model").rglob("*.skops"))
    estimator.write_bytes(estimator.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"differ from bundle\.json"):
        load_record(copy)


@needs_shared
def test_the_recorded_data_is_the_shared_training_split():
    data = load_record()["data"]
    assert data["train_files_sha256"] == train_files_digest(SHARED)
    manifest = hashlib.sha256((SHARED / "MANIFEST.csv").read_bytes()).hexdigest()
    assert data["manifest_csv_sha256"] == manifest


@needs_shared
def test_it_predicts_the_shared_val_films_as_recorded():
    record = load_record()
    model = mlflow.pyfunc.load_model(str(BUNDLE / "model"))
    films = list_split(SHARED, "val")
    answer = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in films]}))
    y = np.array([f.label for f in films])
    measured = binary_metrics(y, answer["probability"].to_numpy(), record["threshold"])
    for name in METRIC_NAMES:
        assert measured[name] == pytest.approx(record["metrics"][f"val_{name}"], abs=1e-6)
    labels = np.where(answer["probability"] >= record["threshold"], "PNEUMONIA", "NORMAL")
    assert list(answer["label"]) == list(labels)


def test_it_registers_as_a_promoted_tagged_checksummed_first_version(mlflow_server):
    settings = make_settings(mlflow_server)
    version = register(settings)
    client = MlflowClient(mlflow_server)
    registered = client.get_model_version_by_alias(settings.model_name, "production")
    assert registered.version == version == "1"
    assert registered.tags["hm.bundled"] == "true" and registered.tags["hm.synthetic"] == "false"
    assert registered.tags["promotion.decision"] == "promoted"
    checksums = json.loads(registered.tags[CHECKSUMS_TAG])
    assert checksums == load_record()["files"]
    run = client.get_run(registered.run_id)
    assert run.data.tags["hm.bundled"] == "true"
    assert run.data.params["features.version"] == load_record()["feature_version"]
    assert {"bundle.json", "ATTRIBUTION.md", "model"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
