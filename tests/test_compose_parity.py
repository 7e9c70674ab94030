"""docker-compose.yaml proven without Docker: its services' own commands and environment, run
as processes in a network namespace (see compose_stack.py), from .env.example as a user copies it.

If a command, port, host name, bucket or variable in the compose file (or a Dockerfile's
ENTRYPOINT, CMD, ENV or COPY) changes so that the stack would break, these tests fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from hm_mlflow.dataset import list_split
from hm_mlflow.synthetic import write_sample_set

from compose_stack import REPO, Stack, can_run, compose_config, fresh_workdir
from support import BIN, NOTEBOOK, executed_text, logged, wait_for_version, wait_until

pytestmark = pytest.mark.integration
MODEL = "chest-xray-pneumonia"  # HM_MODEL_NAME in .env.example


def env_file(workdir: Path, **changes: str) -> Path:
    """.env.example as a user copies it to .env, with `changes` applied."""
    lines = []
    for line in (REPO / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={changes.pop(key)}" if key in changes else line)
    path = workdir / ".env"
    path.write_text("\n".join(lines + [f"{k}={v}" for k, v in changes.items()]) + "\n")
    return path


@pytest.fixture
def workdir():
    reason = can_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the compose parity test must run in CI: {reason}")
        pytest.skip(reason)
    path = fresh_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def source_with_sample(workdir: Path) -> Path:
    """What ./source holds for these tests: a small generated set in source/chest_xray."""
    source = workdir / "source"
    write_sample_set(source / "chest_xray", n_train=60, seed=5)
    return source


def webapp_health(stack: Stack) -> dict:
    return httpx.get(f"http://{stack.address}:8080/health", timeout=10).json()


def wait_for_model(stack: Stack, version: str, timeout: float = 120) -> dict:
    try:
        return wait_for_version(f"http://{stack.address}:8080", version, timeout)
    except TimeoutError as exc:
        raise AssertionError(f"webapp did not serve it: {exc}\n{stack.tail('webapp')}") from exc


def mlflow_api(stack: Stack, path: str, auth=None, **params) -> httpx.Response:
    """MLflow's REST API as the host sees it through the published port: Host localhost:5000
    (MLflow answers only the host names it is told to)."""
    return httpx.get(
        f"http://{stack.address}:5000/api/2.0/mlflow/{path}",
        params=params,
        headers={"Host": "localhost:5000"},
        auth=auth,
        timeout=30,
    )


def versions(stack: Stack) -> list[int]:
    found = mlflow_api(stack, "model-versions/search", filter=f"name='{MODEL}'").json()
    return sorted(int(v["version"]) for v in found["model_versions"])


def test_compose_stack_runs_as_declared(workdir, sample_root):
    # The first model trained on the bucket (the default, the bundled model, is the next test's)
    config = compose_config(env_file(workdir, HM_FIRST_MODEL="train"))
    source = source_with_sample(workdir)
    stack = Stack(config, workdir, binds={str(REPO / "source"): source})
    env = stack.environment("create-buckets")
    try:
        # The default profile: postgres, minio, create-buckets, mlflow, webapp and bootstrap.
        stack.up(["webapp", "bootstrap"])
        stack.wait("bootstrap", "service_completed_successfully", timeout=600)
        health = wait_for_model(stack, "1")
        assert health["model"]["name"] == MODEL

        # The data bucket holds what create-buckets uploaded; MLflow's artifacts are in their
        # bucket, written by the server (the webapp and trainer hold no artifact keys).
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{stack.address}:9000",
            aws_access_key_id=env["MINIO_ROOT_USER"],
            aws_secret_access_key=env["MINIO_ROOT_PASSWORD"],
            region_name="us-east-1",
        )
        data = s3.list_objects_v2(Bucket=env["DATA_BUCKET"], Prefix="chest_xray/train/")
        assert data["KeyCount"] == len(list_split(source / "chest_xray", "train"))
        artifacts = s3.list_objects_v2(Bucket=env["MLFLOW_BUCKET"])["Contents"]
        assert any(obj["Key"].endswith("/MLmodel") for obj in artifacts)

        # Keys per service: the root keys (which reach the artifact bucket) are MinIO's, the
        # bucket job's and MLflow's only; the training services read the data bucket as the
        # reader; the webapp and the access job hold no storage key at all.
        root, reader = env["MINIO_ROOT_PASSWORD"], env["MINIO_READER_PASSWORD"]
        holders = {
            name: {v for v in stack.environment(name).values() if v in (root, reader)}
            for name in config["services"]
        }
        assert {n for n, keys in holders.items() if root in keys} == {
            "minio",
            "create-buckets",
            "mlflow",
        }
        assert {n for n, keys in holders.items() if reader in keys} == {
            "create-buckets",
            "bootstrap",
            "trainer",
            "jupyter",
            "monitor",
        }
        for name in ("bootstrap", "trainer", "jupyter"):
            assert stack.environment(name)["AWS_ACCESS_KEY_ID"] == env["MINIO_READER_USER"]
        assert holders["webapp"] == holders["mlflow-access"] == holders["postgres"] == set()
        # ...and the reader's keys read the data bucket but cannot write, there or elsewhere.
        as_reader = boto3.client(
            "s3",
            endpoint_url=f"http://{stack.address}:9000",
            aws_access_key_id=env["MINIO_READER_USER"],
            aws_secret_access_key=reader,
            region_name="us-east-1",
        )
        assert as_reader.list_objects_v2(Bucket=env["DATA_BUCKET"])["KeyCount"] > 0
        for bucket in (env["DATA_BUCKET"], env["MLFLOW_BUCKET"]):
            with pytest.raises(ClientError) as refused:
                as_reader.put_object(Bucket=bucket, Key="chest_xray/train/x.png", Body=b"x")
            assert refused.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError):
            as_reader.list_objects_v2(Bucket=env["MLFLOW_BUCKET"])
        assert "reader: reads datasource, writes nowhere" in stack.tail("create-buckets")

        # Someone uploads an X-ray to the webapp.
        film = list_split(sample_root, "test")[0]
        answer = httpx.post(
            f"http://{stack.address}:8080/api/predict",
            files={"file": (film.name, film.read_bytes())},
            data={"site": "compose-site"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": MODEL, "version": "1"}

        # The answer is in the prediction log (its own database and role on the postgres
        # service), its film under datasource/feedback/ written with keys that can write there
        # and nowhere else.
        assert "tables ready" in stack.tail("predictions-db")
        webapp_env = stack.environment("webapp")
        recorded = wait_until(lambda: logged(stack.ns, webapp_env, answer.json()["prediction_id"]))
        assert recorded["site"] == "compose-site" and recorded["model_version"] == "1"
        kept = recorded["film"]
        assert kept.startswith(f"s3://{env['DATA_BUCKET']}/feedback/films/")
        bucket, _, key = kept.removeprefix("s3://").partition("/")
        assert wait_until(lambda: s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        assert webapp_env["AWS_ACCESS_KEY_ID"] == env["MINIO_FEEDBACK_USER"]
        assert "feedback: writes datasource/feedback/, reads nothing" in stack.tail(
            "create-buckets"
        )
        as_webapp = boto3.client(
            "s3",
            endpoint_url=f"http://{stack.address}:9000",
            aws_access_key_id=env["MINIO_FEEDBACK_USER"],
            aws_secret_access_key=env["MINIO_FEEDBACK_PASSWORD"],
            region_name="us-east-1",
        )
        for bucket_name, key_name in (
            (env["MLFLOW_BUCKET"], "x"),
            (env["DATA_BUCKET"], "chest_xray/x"),
        ):
            with pytest.raises(ClientError):
                as_webapp.put_object(Bucket=bucket_name, Key=key_name, Body=b"x")
        with pytest.raises(ClientError):
            as_webapp.get_object(Bucket=bucket, Key=key)

        # The monitor's first pass: the version in service, logged to MLflow.
        stack.up(["monitor"])
        wait_until(lambda: "monitoring run" in stack.tail("monitor"), timeout=120)
        assert "no retraining" in stack.tail("monitor")

        # MLflow from the host, through the published port: the run was trained on the bucket.
        alias = mlflow_api(stack, "registered-models/alias", name=MODEL, alias="production")
        run = mlflow_api(stack, "runs/get", run_id=alias.json()["model_version"]["run_id"]).json()
        tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
        params = {p["key"]: p["value"] for p in run["run"]["data"]["params"]}
        assert tags["hm.data_root"] == "s3://datasource/chest_xray"
        assert int(params["data.n_images"]) == data["KeyCount"]

        # docker compose --profile train up trainer
        stack.up(["trainer"])
        stack.wait("trainer", "service_completed_successfully", timeout=600)
        assert versions(stack) == [1, 2]

        # docker compose --profile notebook up jupyter: the token guards it, the notebook runs
        stack.up(["jupyter"])
        stack.wait("jupyter", "service_healthy", timeout=120)
        jupyter = f"http://{stack.address}:8888"
        token = stack.environment("jupyter")["JUPYTER_TOKEN"]
        assert httpx.get(f"{jupyter}/api/contents").status_code == 403
        listing = httpx.get(f"{jupyter}/api/contents", params={"token": token}).json()
        assert "training_notebook.ipynb" in {item["name"] for item in listing["content"]}
        # ...and runs, in the jupyter service's environment (PROFILE = "local"), on the bucket.
        notebook_env = stack.environment("jupyter")
        papermill = [
            str(BIN / "papermill"),
            str(NOTEBOOK),
            f"{notebook_env['HOME']}/executed.ipynb",
            "-k",
            "python3",
            "-p",
            "CV_FOLDS",
            "3",
            "-p",
            "AUGMENT_COPIES",
            "1",
        ]
        executed = subprocess.run(
            stack.ns.argv(papermill),
            env=notebook_env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert executed.returncode == 0, executed.stderr[-3000:]
        assert versions(stack) == [1, 2, 3]
        text = executed_text(Path(notebook_env["HOME"]) / "executed.ipynb")
        assert "Data: `s3://datasource/chest_xray`" in text and "Gate decision:" in text
    finally:
        stack.close()


def test_compose_stack_with_mlflow_authentication(workdir):
    admin_password = "parity-admin-password"
    passwords = {"webapp": "parity-webapp-password", "trainer": "parity-trainer-password"}
    config = compose_config(
        env_file(
            workdir,
            MLFLOW_AUTH="true",
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_WEBAPP_PASSWORD=passwords["webapp"],
            MLFLOW_TRAINER_PASSWORD=passwords["trainer"],
            HM_SAMPLE_SIZE="60",
        )
    )
    stack = Stack(config, workdir, binds={str(REPO / "source"): workdir / "empty-source"})
    (workdir / "empty-source").mkdir()
    try:
        # No data in the bucket: bootstrap registers the bundled model, signed in.
        stack.up(["webapp", "bootstrap"])
        stack.wait("bootstrap", "service_completed_successfully", timeout=600)
        health = wait_for_model(stack, "1")
        assert health["model"]["synthetic"] is False and health["status"] == "ok"
        assert "Registered the bundled model" in stack.tail("bootstrap")

        path = "registered-models/search"
        assert mlflow_api(stack, path).status_code == 401
        assert mlflow_api(stack, path, auth=("admin", "wrong-password")).status_code == 401
        assert mlflow_api(stack, path, auth=("admin", admin_password)).status_code == 200

        # Each client as its own user; the admin's password is MLflow's and the access job's.
        assert "webapp: READ on experiment chest-xray" in stack.tail("mlflow-access")
        assert {
            n for n in config["services"] if admin_password in stack.environment(n).values()
        } == {"mlflow", "mlflow-access"}
        assert stack.environment("webapp")["MLFLOW_TRACKING_USERNAME"] == "webapp"
        assert stack.environment("bootstrap")["MLFLOW_TRACKING_USERNAME"] == "trainer"
        webapp = ("webapp", passwords["webapp"])
        alias = {"name": MODEL, "alias": "production"}
        assert mlflow_api(stack, "registered-models/alias", auth=webapp, **alias).status_code == 200
        moved = httpx.post(
            f"http://{stack.address}:5000/api/2.0/mlflow/registered-models/alias",
            json={**alias, "version": "1"},
            auth=webapp,
            timeout=30,
        )
        assert moved.status_code == 403  # the webapp reads the model and nothing more
    finally:
        stack.close()
