"""Training data on S3 (`s3://bucket/prefix`), against a real S3 API (SeaweedFS)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hm_mlflow import dataset

from support import free_port, run_hm_mlflow, s3_client, s3_env

pytestmark = pytest.mark.integration


def upload_tree(endpoint: str, local: Path, bucket: str, prefix: str) -> None:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.fixture(scope="module")
def s3_root(s3_server, sample_root) -> str:
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    upload_tree(s3_server, sample_root, bucket, "chest_xray")
    return f"s3://{bucket}/chest_xray"


@pytest.fixture
def s3_client_env(s3_server, monkeypatch):
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    dataset._s3.cache_clear()
    yield
    dataset._s3.cache_clear()


@pytest.mark.usefixtures("s3_client_env")
def test_s3_listing_matches_the_local_folder(s3_root, sample_root):
    for split in dataset.SPLITS:
        remote, local = dataset.list_split(s3_root, split), dataset.list_split(sample_root, split)
        assert [(s.name, s.label, s.patient) for s in remote] == [
            (s.name, s.label, s.patient) for s in local
        ]
    first = dataset.list_split(s3_root, "val")[0]
    assert first.location.startswith(f"{s3_root}/val/")
    assert first.read_bytes() == (sample_root / "val" / first.label_name / first.name).read_bytes()
    assert dataset.is_synthetic(s3_root)
    table = dataset.manifest([first], s3_root, ["0" * 64])
    assert table["path"][0] == f"val/{first.label_name}/{first.name}"


@pytest.mark.usefixtures("s3_client_env")
def test_missing_bucket_and_objects_are_reported_plainly(s3_root):
    with pytest.raises(FileNotFoundError, match=r"bucket .* does not exist"):
        dataset.list_split("s3://no-such-bucket-here/chest_xray", "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.read_bytes(f"{s3_root}/train/NORMAL/missing.jpeg")
    assert dataset.list_split(f"{s3_root}-nothing-here", "train") == []


def test_wrong_credentials_and_dead_endpoint(s3_server, s3_root, monkeypatch):
    for name, value in s3_env(s3_server, secret="not-the-secret").items():
        monkeypatch.setenv(name, value)
    dataset._s3.cache_clear()
    with pytest.raises(PermissionError, match="refused"):
        dataset.list_split(s3_root, "train")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    dataset._s3.cache_clear()
    with pytest.raises(ConnectionError, match="cannot reach the S3 endpoint"):
        dataset.list_split(s3_root, "train")
    dataset._s3.cache_clear()


def test_train_command_reads_s3_data(mlflow_server, s3_server, s3_root, tmp_path):
    name = f"cxr-{uuid.uuid4().hex[:8]}"
    env = {
        **s3_env(s3_server),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "HM_MODEL_NAME": name,
        "HM_CV_FOLDS": "3",
        "HM_AUGMENT_COPIES": "1",
        "HM_TRUNK_EPOCHS": "2",
    }
    done = run_hm_mlflow(["train", "--data", s3_root], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["promoted"] and summary["version"] == "1"
    run = MlflowClient(mlflow_server).get_run(summary["run_id"])
    assert run.data.tags["hm.data_root"] == s3_root
    assert run.data.tags["hm.synthetic"] == "true"
    assert run.data.params["data.n_images"] == "80"


def test_train_command_reports_a_missing_bucket_in_one_line(mlflow_server, s3_server, tmp_path):
    env = {**s3_env(s3_server), "MLFLOW_TRACKING_URI": mlflow_server}
    done = run_hm_mlflow(["train", "--data", "s3://no-such-bucket-here/chest_xray"], env, tmp_path)
    assert done.returncode == 1
    assert "Error: the bucket of s3://no-such-bucket-here" in done.stderr
    assert "Traceback" not in done.stderr
