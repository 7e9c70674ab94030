"""The AWS task definitions, run as processes (ecs_stack.py): the MLflow task upgrades its
database, serves, and creates the client users; the training task trains on the data bucket and
promotes a version; the webapp serves it through the internal load balancer's host rules; each
MLflow user can do what secrets.tf says and no more."""

from __future__ import annotations

import json
import shutil
import time

import boto3
import httpx
import pytest

from hm_mlflow.synthetic import write_sample_set

from compose_stack import can_run, fresh_workdir
from ecs_stack import DOMAIN, S3_KEY, S3_PORT, S3_SECRET, EcsStack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack():
    reason = can_run()
    if reason:
        pytest.skip(reason)
    workdir = fresh_workdir()
    stack = EcsStack(workdir)
    try:
        stack.start_infrastructure()
        yield stack
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


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
    # The MLflow task: db-upgrade, then the server, then the access step.
    stack.start_task("mlflow")
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
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{stack.address}:{S3_PORT}",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    for bucket in ("artifacts-bucket", "data-bucket"):
        s3.create_bucket(Bucket=bucket)
    root = write_sample_set(tmp_path / "sample", n_train=60, seed=5)
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "data-bucket", f"chest_xray/{path.relative_to(root)}")

    # The training task, as `aws ecs run-task` starts it.
    stack.run("training", "model-training")
    code = stack.wait_exit("training-model-training", timeout=900)
    log = stack.tail("training-model-training", lines=400)
    assert code == 0, log
    summary = json.loads(log[log.rindex("\n{") + 1 : log.rindex("}") + 1])
    assert summary["version"] == "1" and summary["promoted"] is True
    runs = s3.list_objects_v2(Bucket="artifacts-bucket", Prefix="mlflow/")
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
