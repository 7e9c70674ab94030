"""docker-compose.yaml for real: `cp .env.example .env`, `docker compose up --build`, and the
README's other compose commands, run by docker-compose on podman (compose_engine.py), every
image built from its Dockerfile as it is, the base images stood in for (stand_ins.py).

What is checked is what a user sees: the services' own health checks, the published ports on
127.0.0.1, MLflow's host check, the buckets and their users, the bundled or trained first
model, an answer from the webapp and its row in the prediction log, retraining with the
trainer, the notebook executed inside its container, the users the processes run as, a
restart after MLflow dies, and everything kept in the named volumes across `down` and `up`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from hm_mlflow.dataset import list_split
from hm_mlflow.synthetic import write_sample_set

import compose_engine
import engine
from compose_engine import HealthChecks, PodmanService, Project
from support import LOGGED_SCRIPT, QUICK_TRAINING, wait_for_version, wait_until

pytestmark = pytest.mark.integration
MODEL = "chest-xray-pneumonia"  # HM_MODEL_NAME in .env.example
HOST = "127.0.0.1"  # where .env.example publishes every port


@pytest.fixture(scope="module")
def podman_engine():
    engine.require(compose_engine.missing())
    compose_engine.prepare()
    with PodmanService():
        checks = HealthChecks()
        checks.start()
        yield
        checks.stop()


def mlflow_api(path: str, auth=None, host: str = "localhost:5000", **params) -> httpx.Response:
    """MLflow's REST API through the published port, with the Host header a browser on this
    machine sends (MLflow answers only the host names it is told to)."""
    return httpx.get(
        f"http://{HOST}:5000/api/2.0/mlflow/{path}",
        params=params,
        headers={"Host": host},
        auth=auth,
        timeout=30,
    )


def versions(auth=None) -> list[int]:
    found = mlflow_api("model-versions/search", auth=auth, filter=f"name='{MODEL}'").json()
    return sorted(int(v["version"]) for v in found.get("model_versions", []))


def production(auth=None) -> str:
    alias = mlflow_api("registered-models/alias", auth=auth, name=MODEL, alias="production")
    return alias.json()["model_version"]["version"]


def s3(project: Project, user: str, password: str):
    return boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:9000",
        aws_access_key_id=project.env[user],
        aws_secret_access_key=project.env[password],
        region_name="us-east-1",
    )


def logged(project: Project, prediction_id: str, timeout: float = 120) -> dict:
    """The answer's row in the prediction log, read inside the webapp's container with its own
    settings (the database is on the compose network only), once it is there.

    Retried as the webapp's own writer retries: CI once saw `could not translate host name
    "postgres"` seconds after `down` and `up`, while Debian 12's aardvark-dns (1.4) reloads its
    records at each container start. What the last try printed is in the failure."""
    last: list[str] = []

    def row() -> dict | None:
        done = project.exec("webapp", "python", "-c", LOGGED_SCRIPT, prediction_id, timeout=120)
        last[:] = [done.stderr[-2000:]]
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None

    try:
        return wait_until(row, timeout=timeout)
    except AssertionError:
        names = project.exec("webapp", "getent", "hosts", "postgres", timeout=30)
        raise AssertionError(
            f"no row for {prediction_id} in {timeout:.0f} s; getent hosts postgres: "
            f"{names.returncode} {names.stdout.strip()!r}; last try: {last[0] if last else ''}"
        ) from None


def up_build(project: Project) -> None:
    """`docker compose up --build`: the default profile's images built from their Dockerfiles,
    then every service started. docker-compose 1.29 would build an image once per service that
    names it (mlflow's three times, the model's twice), so each image is built once, by the
    first service that names it, and `up` finds them."""
    started = time.monotonic()
    project.compose("build", "create-buckets", "mlflow", "webapp", "bootstrap", timeout=3600)
    built = time.monotonic()
    project.compose("up", "-d", timeout=1800)
    print(f"\ncompose build {built - started:.0f} s, up {time.monotonic() - built:.0f} s")


def uid(project: Project, service: str) -> str:
    """The user the service's main process (PID 1) runs as."""
    status = project.exec(service, "cat", "/proc/1/status").stdout
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))


@pytest.mark.timeout(3600)  # the first `up --build` builds five images
def test_compose_up_build_as_the_readme_says(podman_engine, sample_root):
    project = Project("hmcompose", QUICK_TRAINING)
    source = project.dir / "source" / "chest_xray"
    write_sample_set(source, n_train=60, seed=5)  # the user's data, where source/README.md says
    try:
        up_build(project)
        assert project.wait_exit("bootstrap") == 0, project.logs("bootstrap")
        for service in ("postgres", "minio", "mlflow", "webapp"):
            project.wait_healthy(service)
        assert wait_for_version(f"http://{HOST}:8080", "1", timeout=180)["model"]["name"] == MODEL

        # The data bucket holds what create-buckets uploaded, MLflow's artifacts theirs.
        root = s3(project, "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
        data = root.list_objects_v2(Bucket="datasource", Prefix="chest_xray/train/")
        assert data["KeyCount"] == len(list_split(source, "train"))
        artifacts = root.list_objects_v2(Bucket="mlflow")["Contents"]
        assert any(obj["Key"].endswith("/MLmodel") for obj in artifacts)
        # The reader reads the data bucket and writes nowhere; the webapp's user writes films.
        reader = s3(project, "MINIO_READER_USER", "MINIO_READER_PASSWORD")
        assert reader.list_objects_v2(Bucket="datasource")["KeyCount"] > 0
        for bucket in ("datasource", "mlflow"):
            with pytest.raises(ClientError) as refused:
                reader.put_object(Bucket=bucket, Key="chest_xray/train/x.png", Body=b"x")
            assert refused.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError):
            reader.list_objects_v2(Bucket="mlflow")
        assert "reader: reads datasource, writes nowhere" in project.logs("create-buckets")

        # MLflow on the published port, behind its host check; the first model, the bundled
        # one, registered by bootstrap (.env.example's HM_FIRST_MODEL=bundled).
        assert mlflow_api("experiments/search", max_results=1).status_code == 200
        elsewhere = mlflow_api("experiments/search", host="evil.example", max_results=1)
        assert elsewhere.status_code == 403
        assert "Registered the bundled model" in project.logs("bootstrap")

        # Someone uploads an X-ray on the published port; the answer is logged, its film kept.
        film = list_split(sample_root, "test")[0]

        def upload(site: str) -> httpx.Response:
            answer = httpx.post(
                f"http://{HOST}:8080/api/predict",
                files={"file": (film.name, film.read_bytes())},
                data={"site": site},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            return answer

        answer = upload("compose-site")
        assert answer.json()["model"] == {"name": MODEL, "version": "1"}
        prediction_id = answer.json()["prediction_id"]
        row = logged(project, prediction_id)
        assert row["site"] == "compose-site" and row["model_version"] == "1"
        bucket, _, key = row["film"].removeprefix("s3://").partition("/")
        assert bucket == "datasource" and key.startswith("feedback/films/")
        assert wait_until(lambda: root.head_object(Bucket=bucket, Key=key)["ContentLength"])
        feedback = s3(project, "MINIO_FEEDBACK_USER", "MINIO_FEEDBACK_PASSWORD")
        with pytest.raises(ClientError):
            feedback.get_object(Bucket=bucket, Key=key)  # write-only, even its own films

        # The processes run as the images' non-root users and write what they must.
        for service in ("mlflow", "webapp", "monitor"):
            assert uid(project, service) == "10001", service
            probe = project.exec(service, "sh", "-c", 'mktemp -p /tmp && mktemp -p "$HOME"')
            assert probe.returncode == 0, f"{service}: {probe.stderr}"
        assert uid(project, "postgres") == "999"  # the entrypoint drops to the postgres user
        # The monitor service's first pass at start; then a pass on demand inside it, which
        # logs the version that answered to MLflow. (`exec`, not `run`: docker-compose 1.29's
        # one-off containers use links, which podman does not have.)
        wait_until(lambda: "no retraining" in project.logs("monitor"), timeout=180)
        once = project.exec("monitor", "hm-mlflow", "monitor")
        assert "version 1: monitoring run" in once.stdout, once.stdout + once.stderr

        # docker compose --profile train up trainer: a second version, trained on the bucket
        # and judged (the gate keeps the bundled model, trained on real films, in service)
        project.compose("--profile", "train", "up", "-d", "trainer")
        assert project.wait_exit("trainer") == 0, project.logs("trainer")
        assert versions() == [1, 2]
        second = mlflow_api("model-versions/get", name=MODEL, version="2").json()
        run = mlflow_api("runs/get", run_id=second["model_version"]["run_id"]).json()["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["hm.data_root"] == "s3://datasource/chest_xray"

        # docker compose --profile notebook up jupyter: JupyterLab as the host user (uid
        # 1000 owns the checkout, as on a laptop), its token, the notebook run inside it.
        os.chown(project.dir / "jupyter", 1000, 1000)
        os.chown(project.dir / "jupyter" / "training_notebook.ipynb", 1000, 1000)
        project.compose("--profile", "notebook", "build", "jupyter", timeout=3600)
        project.compose("--profile", "notebook", "up", "-d", "jupyter")
        project.wait_healthy("jupyter", timeout=240)
        token = project.env["JUPYTER_TOKEN"]
        assert httpx.get(f"http://{HOST}:8888/api/contents").status_code == 403
        listing = httpx.get(f"http://{HOST}:8888/api/contents", params={"token": token}).json()
        assert "training_notebook.ipynb" in {item["name"] for item in listing["content"]}
        executed = project.exec(
            "jupyter", "papermill", "training_notebook.ipynb", "/tmp/executed.ipynb",
            "-k", "python3", "-p", "CV_FOLDS", "3", "-p", "AUGMENT_COPIES", "1",
            timeout=900,
        )  # fmt: skip
        assert executed.returncode == 0, executed.stderr[-3000:]
        text = project.exec("jupyter", "cat", "/tmp/executed.ipynb").stdout
        assert "Data: `s3://datasource/chest_xray`" in text and "Gate decision:" in text
        assert versions() == [1, 2, 3]

        # MLflow stopped: the webapp says it is degraded, and ok again once MLflow is back.
        def webapp_status() -> str:
            return httpx.get(f"http://{HOST}:8080/health", timeout=10).json()["status"]

        project.compose("stop", "mlflow")
        assert wait_until(lambda: webapp_status() == "degraded", timeout=180)
        project.compose("start", "mlflow")
        project.wait_healthy("mlflow", timeout=240)
        assert wait_until(lambda: webapp_status() == "ok", timeout=180)
        # MLflow crashes (its main process killed from outside, as the kernel's OOM killer
        # would): the restart policy brings it back.
        before = project.restarts("mlflow")
        os.kill(project.state("mlflow")["Pid"], signal.SIGKILL)
        wait_until(lambda: project.restarts("mlflow") > before, timeout=120)
        project.wait_healthy("mlflow", timeout=240)

        # docker compose down, then up: runs, versions, films and the log are in the volumes.
        project.compose("--profile", "train", "--profile", "notebook", "down", "--timeout", "20")
        project.compose("up", "-d")
        project.wait_healthy("webapp", timeout=300)
        assert versions() == [1, 2, 3]
        assert root.list_objects_v2(Bucket="datasource", Prefix="chest_xray/train/")["KeyCount"]
        assert logged(project, prediction_id)["site"] == "compose-site"
        wait_for_version(f"http://{HOST}:8080", production(), timeout=180, healthy=True)
        # and the webapp's writer reaches the database again: a new answer is logged
        again = upload("after-restart")
        assert logged(project, again.json()["prediction_id"])["site"] == "after-restart"
    finally:
        project.close()


@pytest.mark.timeout(1800)
def test_compose_with_mlflow_authentication(podman_engine):
    admin = "compose-admin-password"
    passwords = {"webapp": "compose-webapp-password", "trainer": "compose-trainer-password"}
    project = Project(
        "hmcomposeauth",
        {
            "MLFLOW_AUTH": "true",
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
            "MLFLOW_WEBAPP_PASSWORD": passwords["webapp"],
            "MLFLOW_TRAINER_PASSWORD": passwords["trainer"],
        },
    )
    try:
        # No data in source/: bootstrap registers the bundled model, signed in as the trainer.
        up_build(project)
        assert project.wait_exit("bootstrap") == 0, project.logs("bootstrap")
        health = wait_for_version(f"http://{HOST}:8080", "1", timeout=180)
        assert health["model"]["synthetic"] is False and health["status"] == "ok"
        assert "Registered the bundled model" in project.logs("bootstrap")
        path = "registered-models/search"
        assert mlflow_api(path).status_code == 401
        assert mlflow_api(path, auth=("admin", "wrong-password")).status_code == 401
        assert mlflow_api(path, auth=("admin", admin)).status_code == 200
        assert "webapp: READ on experiment chest-xray" in project.logs("mlflow-access")
        webapp = ("webapp", passwords["webapp"])
        alias = {"name": MODEL, "alias": "production"}
        assert mlflow_api("registered-models/alias", auth=webapp, **alias).status_code == 200
        moved = httpx.post(
            f"http://{HOST}:5000/api/2.0/mlflow/registered-models/alias",
            json={**alias, "version": "1"},
            headers={"Host": "localhost:5000"},
            auth=webapp,
            timeout=30,
        )
        assert moved.status_code == 403  # the webapp reads the model and nothing more
    finally:
        project.close()
