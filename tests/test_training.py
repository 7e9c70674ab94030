"""Training through a real MLflow server: what a run records, what the model carries, the gate."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io
from mlflow import MlflowClient

from hm_mlflow import features
from hm_mlflow.dataset import list_split
from hm_mlflow.evaluate import evaluate_model
from hm_mlflow.shifts import PANEL
from hm_mlflow.train import train

from support import BIN, make_settings, run_hm_mlflow

pytestmark = pytest.mark.integration
EVALUATE_KEYS = {"n", "accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "digest"}


def test_first_version_is_registered_and_promoted(trained):
    settings, result = trained
    client = MlflowClient(settings.tracking_uri)
    assert result.version == "1"
    assert result.decision.promote
    production = client.get_model_version_by_alias(settings.model_name, "production")
    assert production.version == "1"
    assert production.run_id == result.run_id
    assert production.tags["promotion.decision"] == "promoted"
    assert "no version held the alias" in production.tags["promotion.reason"]
    assert production.description.startswith("Promoted on ")
    assert "NORMAL vs PNEUMONIA" in client.get_registered_model(settings.model_name).description


def test_run_records_params_metrics_plots_and_data(trained):
    settings, result = trained
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags

    assert params["data.n_images"] == "80"
    assert params["cv.grouping"] == "patient"
    assert params["features.version"] == features.FEATURE_VERSION
    assert tags["hm.synthetic"] == "true"
    for name in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert 0 <= metrics[f"cv_{name}_mean"] <= 1
        assert metrics[f"cv_{name}_std"] >= 0
        assert 0 <= metrics[f"val_{name}"] <= 1
        assert 0 <= metrics[f"test_{name}"] <= 1
    # Learnable, not trivial: the synthetic task is neither noise nor solved.
    assert 0.7 < metrics["cv_oof_roc_auc"] < 1.0
    assert 0 < metrics["threshold"] < 1

    # The learned trunk: its size, epochs, loss curve and the ONNX file's checksum are logged,
    # and OpenCV's run of the exported graph agrees with the trained network.
    assert int(params["trunk.epochs"]) == settings.trunk_epochs
    assert int(params["trunk.parameters"]) > 10_000
    losses = client.get_metric_history(result.run_id, "trunk_loss")
    assert [m.step for m in losses] == list(range(settings.trunk_epochs))
    assert all(np.isfinite(m.value) and m.value > 0 for m in losses)
    assert metrics["trunk_onnx_max_diff"] <= 1e-3
    # The framing-matched estimate: its own metrics, not part of the panel's pool.
    assert 0.5 < metrics["framed_roc_auc"] <= 1 and 0 <= metrics["framed_specificity"] <= 1
    assert len(params["trunk.onnx_sha256"]) == 64

    # The transfer estimate: pooled over the panel, the worst shift no better than the pool,
    # every shift in transfer/shifts.json; the operating point keeps the sensitivity floor there.
    assert params["transfer.shifts"] == ",".join(PANEL)
    assert metrics["transfer_worst_specificity"] <= metrics["transfer_specificity"] <= 1
    assert 0.5 < metrics["transfer_roc_auc"] <= 1
    shifts = json.loads(
        Path(client.download_artifacts(result.run_id, "transfer/shifts.json")).read_text()
    )
    assert list(shifts["shifts"]) == list(PANEL)
    assert shifts["threshold"] == pytest.approx(metrics["threshold"])
    caught = (metrics["cv_oof_sensitivity"] + len(PANEL) * metrics["transfer_sensitivity"]) / (
        1 + len(PANEL)
    )
    assert caught >= settings.sensitivity_floor - 1e-9

    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/cv_roc.png", "plots/cv_confusion.png"}
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == params["data.digest"]
    manifest = client.download_artifacts(result.run_id, "data/train_manifest.json")
    table = json.loads(Path(manifest).read_text())
    assert len(table["data"]) == 80


def test_model_carries_its_own_preprocessing(trained, tmp_path):
    """The registered model holds the exact features.py of training and predicts from bytes."""
    settings, _ = trained
    mlflow.set_tracking_uri(settings.tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{settings.model_name}@production", dst_path=str(tmp_path)
        )
    )
    onnx = next(local.rglob("trunk.onnx")).read_bytes()
    run = MlflowClient(settings.tracking_uri).get_run(
        mlflow.pyfunc.load_model(f"models:/{settings.model_name}@production").metadata.run_id
    )
    assert hashlib.sha256(onnx).hexdigest() == run.data.params["trunk.onnx_sha256"]
    shipped = next(local.rglob("features.py")).read_bytes()
    assert (
        hashlib.sha256(shipped).digest()
        == hashlib.sha256(Path(features.__file__).read_bytes()).digest()
    )
    assert (local / "model_code.py").is_file()
    # Two linear models per calibration fold: small on disk and small to parse when loading
    # (a ColumnTransformer's index lists once made it 50 MB of JSON).
    estimator = next(local.rglob("estimator.skops"))
    assert estimator.stat().st_size < 2_000_000
    with zipfile.ZipFile(estimator) as archive:
        assert sum(member.file_size for member in archive.infolist()) < 5_000_000
    requirements = (local / "requirements.txt").read_text()
    assert "opencv-python-headless==" in requirements and "scikit-learn==" in requirements


def test_served_predictions_equal_training_features_and_estimator(trained, sample_root, tmp_path):
    """One source of truth: the pyfunc (serving path) gives what the package's features and the
    fitted estimator give."""
    settings, _ = trained
    mlflow.set_tracking_uri(settings.tracking_uri)
    uri = f"models:/{settings.model_name}@production"
    model = mlflow.pyfunc.load_model(uri)
    samples = list_split(sample_root, "test")[:10]
    served = model.predict(pd.DataFrame({"image": [s.read_bytes() for s in samples]}))

    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    path = next(local.rglob("estimator.skops"))
    estimator = skops.io.load(path, trusted=skops.io.get_untrusted_types(file=str(path)))
    # The learned trunk travels as an ONNX graph; OpenCV runs it for the package's features too.
    trunk = features.Trunk(next(local.rglob("trunk.onnx")).read_bytes())
    vectors = np.stack([features.extract(s.read_bytes(), trunk) for s in samples])
    assert vectors.shape[1] == features.n_features() + trunk.width
    direct = estimator.predict_proba(vectors)
    np.testing.assert_allclose(served["probability"].to_numpy(), direct[:, 1], rtol=1e-6)
    threshold = model.model_config["threshold"]
    expected = np.where(direct[:, 1] >= threshold, "PNEUMONIA", "NORMAL")
    assert served["label"].tolist() == expected.tolist()
    # The webapp's path: the collapsed estimator, one image at a time, no pandas.
    python_model = model.unwrap_python_model()
    assert python_model.linear is not None
    one_by_one = [python_model.classify(s.read_bytes())[0] for s in samples]
    np.testing.assert_allclose(one_by_one, direct[:, 1], rtol=0, atol=1e-6)


def test_gate_rejects_a_model_that_is_not_better_and_force_overrides(mlflow_server, sample_root):
    settings = make_settings(mlflow_server)
    first = train(sample_root, settings, progress=False)
    assert first.decision.promote

    # Same data, same seed: an identical model cannot beat the incumbent.
    same = train(sample_root, settings, progress=False)
    assert not same.decision.promote
    assert "does not beat version 1" in same.decision.reason
    client = MlflowClient(settings.tracking_uri)
    assert client.get_model_version_by_alias(settings.model_name, "production").version == "1"
    rejected = client.get_model_version(settings.model_name, same.version)
    assert rejected.tags["promotion.decision"] == "rejected"
    assert rejected.description.startswith("Not promoted on ")
    run = client.get_run(same.run_id)
    assert run.data.metrics["gate_incumbent_roc_auc"] == pytest.approx(
        run.data.metrics["test_roc_auc"]
    )

    # A crippled model (no regularisation budget at all) is rejected too.
    weak = train(sample_root, settings, params={"C": 1e-7}, progress=False)
    assert not weak.decision.promote

    forced = train(sample_root, settings, force=True, progress=False)
    assert forced.decision.promote and forced.decision.reason.startswith("forced (--force)")
    assert (
        client.get_model_version_by_alias(settings.model_name, "production").version
        == forced.version
    )


def test_a_stop_whose_exception_was_lost_still_stops_the_run(
    mlflow_server, sample_root, monkeypatch
):
    """A stop signal whose KeyboardInterrupt Python swallowed (it fired inside a finaliser)
    still ends the run as KILLED before the gate: nothing is promoted."""
    import threading

    from hm_mlflow import interrupt, modeling
    from hm_mlflow.train import cross_validate, prepare, register

    settings = make_settings(mlflow_server)
    prepared = prepare(sample_root, settings, progress=False)
    validated = cross_validate(prepared, settings)
    monkeypatch.setattr(interrupt, "INTERRUPTED", threading.Event())
    fit = modeling.fit_calibrated

    def fit_then_signal_lost(*args, **kwargs):
        interrupt.INTERRUPTED.set()  # the handler ran; its exception never reached us
        return fit(*args, **kwargs)

    monkeypatch.setattr(modeling, "fit_calibrated", fit_then_signal_lost)
    with pytest.raises(KeyboardInterrupt):
        register(prepared, validated, settings, progress=False)
    client = MlflowClient(settings.tracking_uri)
    (version,) = client.search_model_versions(f"name = '{settings.model_name}'")
    assert client.get_run(version.run_id).info.status == "KILLED"
    assert "promotion.decision" not in version.tags
    assert not client.get_registered_model(settings.model_name).aliases


def test_evaluate_cli_prints_one_json_object(trained, sample_root, tmp_path):
    settings, _ = trained
    uri = f"models:/{settings.model_name}@production"
    env = {"PATH": str(BIN), "MLFLOW_TRACKING_URI": settings.tracking_uri, "HOME": str(tmp_path)}
    args = ["evaluate", "--data", str(sample_root), "--split", "test", "--model-uri", uri, "--json"]
    done = run_hm_mlflow(args, env, tmp_path, timeout=300, inherit_env=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert set(result) == EVALUATE_KEYS
    assert result["n"] == len(list_split(sample_root, "test"))
    mlflow.set_tracking_uri(settings.tracking_uri)
    assert result == pytest.approx(evaluate_model(uri, sample_root, "test", progress=False))


def test_every_command_works_on_a_sqlite_uri_without_a_server(sample_root, tmp_path, monkeypatch):
    """Train and evaluate straight into a SQLite file, as a notebook without a server would."""
    monkeypatch.chdir(tmp_path)  # the SQLite store keeps artifacts beside the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = make_settings(uri)
    result = train(sample_root, settings, progress=False)
    assert result.decision.promote

    env = {
        "PATH": str(BIN),
        "MLFLOW_TRACKING_URI": uri,
        "HOME": str(tmp_path),
        "HM_MODEL_NAME": settings.model_name,
    }
    args = ["evaluate", "--data", str(sample_root), "--split", "val", "--json"]
    done = run_hm_mlflow(args, env, tmp_path, timeout=300, inherit_env=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == EVALUATE_KEYS and result["n"] == 16


def test_evaluate_cli_reports_a_missing_model_plainly(mlflow_server, sample_root, tmp_path):
    env = {"PATH": str(BIN), "MLFLOW_TRACKING_URI": mlflow_server, "HOME": str(tmp_path)}
    uri = "models:/no-such-model@production"
    args = ["evaluate", "--data", str(sample_root), "--model-uri", uri, "--json"]
    done = run_hm_mlflow(args, env, tmp_path, timeout=300, inherit_env=False)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "no-such-model" in done.stderr
    assert "Traceback" not in done.stderr


def test_clear_errors_for_a_missing_extra_and_a_bad_param(tmp_path):
    shadow = tmp_path / "no-matplotlib"
    shadow.mkdir()
    (shadow / "matplotlib.py").write_text("raise ModuleNotFoundError(\"No module named 'x'\")\n")
    done = run_hm_mlflow(["train"], {"PYTHONPATH": str(shadow)}, tmp_path)
    assert done.returncode == 1
    assert "pip install 'hm-mlflow[train]'" in done.stderr and "matplotlib" in done.stderr
    assert "Traceback" not in done.stderr
    for param, words in (
        ("C=abc", "must be a number"),
        ("gamma=1", "not a parameter of the model (it takes: C)"),
        ("C", "NAME=VALUE"),
    ):
        done = run_hm_mlflow(["train", "--param", param], {}, tmp_path)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_unreadable_training_images_are_skipped_named_and_counted(
    mlflow_server, sample_root, tmp_path
):
    root = tmp_path / "chest_xray"
    shutil.copytree(sample_root, root)
    broken = sorted((root / "train" / "NORMAL").iterdir())[0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature, no image
    settings = make_settings(mlflow_server)
    result = train(root, settings, progress=False)
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["data.n_unreadable"] == "1"
    assert run.data.params["data.n_images"] == "79"
    listed = json.loads(
        Path(client.download_artifacts(result.run_id, "data/unreadable.json")).read_text()
    )
    assert listed == {"unreadable": [str(broken)]}

    for film in sorted((root / "train" / "PNEUMONIA").iterdir())[:5]:
        film.write_bytes(b"not an image at all")
    done = run_hm_mlflow(
        ["train", "--data", str(root)],
        {"MLFLOW_TRACKING_URI": settings.tracking_uri, "HM_MODEL_NAME": settings.model_name},
        tmp_path,
    )
    assert done.returncode == 1
    assert "6 of 80 training images cannot be read" in done.stderr and str(broken) in done.stderr
    assert "Traceback" not in done.stderr
