"""The AWS task definitions, run as containers of the built images (ecs_stack.py): the MLflow
task upgrades its database, serves, and creates the client users; the training task trains on the
data bucket and promotes a version; the webapp serves it through the internal load balancer's host
rules; each MLflow user can do what secrets.tf says and no more. Then the training notebook as the
SageMaker notebook instance runs it: PROFILE = "cloud", the environment its lifecycle
configuration writes, MLflow by name with the password from Secrets Manager, more than 1,000
films in one class."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from hm_mlflow.synthetic import write_sample_set

import engine
from ecs_stack import DOMAIN, S3_KEY, S3_PORT, S3_SECRET, WEBAPP_KEY, WEBAPP_SECRET, EcsStack
from process_stack import can_run, fresh_workdir
from support import BIN, NOTEBOOK, QUICK_TRAINING, executed_text, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(project_images):
    """The deployment's infrastructure with the MLflow task running and empty buckets."""
    engine.require(can_run())
    workdir = fresh_workdir()
    stack = EcsStack(workdir, project_images)
    try:
        stack.start_infrastructure()
        stack.start_task("mlflow")
        for bucket in ("artifacts-bucket", "data-bucket"):
            s3(stack).create_bucket(Bucket=bucket)
        yield stack
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


def s3(stack: EcsStack):
    return boto3.client(
        "s3",
        endpoint_url=f"http://{stack.address}:{S3_PORT}",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def through_alb(stack: EcsStack, host: str, method: str, path: str, **kwargs) -> httpx.Response:
    """A request as a client inside the VPC sends it: to the load balancer, Host = the name."""
    return httpx.request(
        method,
        f"http://{stack.address}{path}",
        headers={"Host": host, **kwargs.pop("headers", {})},
        timeout=60,
        **kwargs,
    )


def mlflow_as(stack: EcsStack, user: str | None, path: str, method: str = "GET", **kwargs):
    auth = (user, stack.aws.secret(user)) if user else None
    return through_alb(
        stack, f"mlflow.{DOMAIN}", method, f"/api/2.0/mlflow/{path}", auth=auth, **kwargs
    )


def test_the_cloud_deployment_trains_promotes_and_serves(stack, tmp_path):
    # The MLflow task has run db-upgrade, then the server, then the access step.
    assert "Creating initial MLflow database tables" in stack.tail("mlflow-db-upgrade")
    assert "sslmode=require" not in stack.tail("mlflow-mlflow")  # never logged
    access = stack.tail("mlflow-access")
    for user, permission in (("webapp", "READ"), ("trainer", "EDIT"), ("notebook", "EDIT")):
        assert f"{user}: {permission} on experiment chest-xray" in access

    # Through the internal load balancer: host rules, MLflow's host check, authentication.
    assert through_alb(stack, f"mlflow.{DOMAIN}", "GET", "/health").status_code == 200
    assert through_alb(stack, f"other.{DOMAIN}", "GET", "/health").status_code == 404
    assert mlflow_as(stack, None, "experiments/search", "POST", json={}).status_code == 401
    listed = mlflow_as(stack, "webapp", "experiments/search", "POST", json={"max_results": 10})
    assert listed.status_code == 200
    assert [e["name"] for e in listed.json()["experiments"]] == ["chest-xray"]

    # The data bucket, as `hm-mlflow cloud upload-data` fills it.
    root = write_sample_set(tmp_path / "sample", n_train=60, seed=5)
    for path in root.rglob("*"):
        if path.is_file():
            s3(stack).upload_file(str(path), "data-bucket", f"chest_xray/{path.relative_to(root)}")

    # The training task, as `aws ecs run-task` starts it.
    stack.run("training", "model-training", overrides=QUICK_TRAINING)
    code = stack.wait_exit("training-model-training", timeout=900)
    log = stack.tail("training-model-training", lines=400)
    assert code == 0, log
    summary = json.loads(log[log.rindex("\n{") + 1 : log.rindex("}") + 1])
    assert summary["version"] == "1" and summary["promoted"] is True
    runs = s3(stack).list_objects_v2(Bucket="artifacts-bucket", Prefix="mlflow/")
    assert runs.get("KeyCount", 0) > 0  # the server wrote the artifacts, the task could not

    # The webapp task serves it, through app.DOMAIN, by itself.
    stack.start_task("webapp")
    film = next((root / "test" / "PNEUMONIA").iterdir()).read_bytes()
    answer, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = through_alb(
            stack,
            f"app.{DOMAIN}",
            "POST",
            "/api/predict",
            files={"file": ("x.png", film, "image/png")},
        )
        if answer.status_code == 200:
            break
        time.sleep(1)
    assert answer.status_code == 200, f"{answer.text}\n{stack.tail('webapp-webapp')}"
    assert answer.json()["model"]["version"] == "1"

    # The answer is in the prediction log (the RDS instance's own `predictions` database, made
    # by the MLflow task's predictions-db step, over TLS) and its film under the data bucket's
    # feedback prefix, written with the webapp role's keys, which can do nothing else.
    assert "tables ready" in stack.tail("mlflow-predictions-db")
    row = wait_until(lambda: stack.logged(answer.json()["prediction_id"]))
    assert row["model_version"] == "1" and row["film"].startswith("s3://data-bucket/feedback/")
    key = row["film"].removeprefix("s3://data-bucket/")
    assert wait_until(lambda: s3(stack).head_object(Bucket="data-bucket", Key=key))
    as_webapp = boto3.client(
        "s3",
        endpoint_url=f"http://{stack.address}:{S3_PORT}",
        aws_access_key_id=WEBAPP_KEY,
        aws_secret_access_key=WEBAPP_SECRET,
        region_name="us-east-1",
    )
    for bucket, name in (("data-bucket", "chest_xray/x"), ("artifacts-bucket", "mlflow/x")):
        with pytest.raises(ClientError):
            as_webapp.put_object(Bucket=bucket, Key=name, Body=b"x")
    with pytest.raises(ClientError):
        as_webapp.get_object(Bucket="data-bucket", Key=key)

    # The monitor task, as the daily schedule starts it: MLflow gets the in-service figures.
    stack.run("monitor", "monitor")
    code = stack.wait_exit("monitor-monitor", timeout=300)
    assert code == 0, stack.tail("monitor-monitor")
    assert "monitoring run" in stack.tail("monitor-monitor")
    assert "no retraining" in stack.tail("monitor-monitor")

    # Least privilege: the webapp reads, and only reads.
    model = {"name": "chest-xray-pneumonia"}
    alias = {**model, "alias": "production", "version": "1"}
    assert (
        mlflow_as(
            stack,
            "webapp",
            "registered-models/alias",
            "GET",
            params={"name": model["name"], "alias": "production"},
        ).status_code
        == 200
    )
    assert (
        mlflow_as(stack, "webapp", "registered-models/alias", "POST", json=alias).status_code == 403
    )
    assert (
        mlflow_as(
            stack,
            "webapp",
            "runs/create",
            "POST",
            json={"experiment_id": listed.json()["experiments"][0]["experiment_id"]},
        ).status_code
        == 403
    )
    assert (
        mlflow_as(stack, "notebook", "registered-models/alias", "POST", json=alias).status_code
        == 200
    )


def test_the_notebook_runs_on_the_notebook_instance(stack, tmp_path):
    import cv2

    stack.start_secrets_manager()
    # The data bucket with more than 1,000 films in one class folder (two listing pages).
    bucket = s3(stack)
    root = write_sample_set(tmp_path / "films", n_train=60, seed=9)
    for path in root.rglob("*"):
        if path.is_file():
            bucket.upload_file(str(path), "data-bucket", f"chest_xray/{path.relative_to(root)}")
    films = sorted((root / "train" / "PNEUMONIA").iterdir())
    for i in range(1000):
        film = cv2.imread(str(films[i % len(films)]), cv2.IMREAD_GRAYSCALE)
        small = cv2.resize(film, (160, 160), interpolation=cv2.INTER_AREA)
        bucket.put_object(
            Bucket="data-bucket",
            Key=f"chest_xray/train/PNEUMONIA/synth-{9000 + i}-1.png",
            Body=cv2.imencode(".png", small)[1].tobytes(),
        )
    pages = bucket.get_paginator("list_objects_v2").paginate(
        Bucket="data-bucket", Prefix="chest_xray/train/PNEUMONIA/"
    )
    in_folder = sum(len(page.get("Contents", [])) for page in pages)
    assert in_folder > 1000

    environment = {**stack.notebook_environment(), "HM_TRUNK_EPOCHS": "2"}
    assert environment["MLFLOW_TRACKING_URI"] == f"http://mlflow.{DOMAIN}"
    assert "MLFLOW_TRACKING_PASSWORD" not in environment  # read from Secrets Manager
    output = tmp_path / "executed.ipynb"
    done = subprocess.run(
        stack.ns.argv(
            [
                str(BIN / "papermill"),
                str(NOTEBOOK),
                str(output),
                "-k",
                "python3",
                "--cwd",
                str(NOTEBOOK.parent),
                "-p",
                "PROFILE",
                "cloud",
                "-p",
                "CV_FOLDS",
                "3",
                "-p",
                "AUGMENT_COPIES",
                "0",
            ]
        ),
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    text = executed_text(output)
    assert "Gate decision:" in text
    assert f"MLflow: `http://mlflow.{DOMAIN}`" in text
    balance = re.search(r"train\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert balance and int(balance.group(2)) == in_folder  # every page was listed
    assert stack.aws.secret("notebook") not in output.read_text()

    # A new version, registered by the notebook's run, with the notebook's figures.
    versions = mlflow_as(stack, "notebook", "registered-models/search", "GET").json()
    latest = max(
        int(v["version"])
        for m in versions["registered_models"]
        for v in m.get("latest_versions", [])
    )
    assert f"Version {latest}:" in text
    run_id = re.search(r"/runs/([0-9a-f]{32})", text).group(1)
    listed = mlflow_as(
        stack, "notebook", "artifacts/list", "GET", params={"run_id": run_id, "path": "notebook"}
    ).json()
    names = [f["path"] for f in listed.get("files", [])]
    assert "notebook/01_sample_grid.png" in names and len(names) >= 7
