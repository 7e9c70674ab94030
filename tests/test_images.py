"""What only an engine shows about the images: they run with a read-only root filesystem and
only /tmp writable, as infra/ecs.tf runs every task (readonlyRootFilesystem, one task volume on
/tmp, no tmpfs of the engine's own), as their non-root users; and how big they are.

The three containers make the smallest platform: MLflow on SQLite in /tmp, the model image
registering the bundled model (`hm-mlflow bootstrap`, which downloads, logs and writes plots),
the webapp answering a film with its prediction log in /tmp. Each has its own /tmp, made as
Fargate makes a task volume's bind mount (ecs_stack.py): root's and 0755 unless the image
declares /tmp a VOLUME.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from hm_mlflow.dataset import list_split

import engine
import stand_ins
from ecs_stack import expose_declared_volume, new_bind_mount
from support import wait_for_version

pytestmark = pytest.mark.integration
READ_ONLY = ["--read-only", "--read-only-tmpfs=false"]  # as ECS: nothing writable but volumes


@pytest.fixture(scope="module")
def images(project_images) -> dict[str, str]:
    return project_images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Containers:
    """Containers, their /tmp folders and a network made for one test, removed after it."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(4)
        self.network = f"hm-ro-{self.tag}"
        self.names: list[str] = []
        self.folders = Path(tempfile.mkdtemp(prefix="hm-ro-"))
        engine.podman("network", "create", self.network)

    def tmp(self, name: str, image: str) -> Path:
        """The container's /tmp, as Fargate mounts a task volume there."""
        folder = new_bind_mount(self.folders / name)
        expose_declared_volume(image, "/tmp", folder)
        return folder

    def run(self, name: str, image: str, *argv: str, env: dict, detach: bool = True, ports=()):
        args = ["run", *READ_ONLY, "--network", self.network, "--name", name]
        args += ["-v", f"{self.tmp(name, image)}:/tmp"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for port in ports:
            args += ["-p", port]
        self.names.append(name)
        return engine.podman(*args, *(["-d"] if detach else []), image, *argv, check=False)

    def logs(self, name: str) -> str:
        done = engine.podman("logs", "--tail", "40", name, check=False)
        return done.stdout + done.stderr

    def close(self) -> None:
        for name in self.names:
            engine.podman("rm", "-f", "-t", "5", name, check=False)
        shutil.rmtree(self.folders, ignore_errors=True)
        engine.podman("network", "rm", "-f", self.network, check=False)


def wait_healthy(name: str, logs, timeout: float = 240) -> None:
    """The image's own HEALTHCHECK, run as podman's timer would (there is no systemd here)."""
    deadline = time.monotonic() + timeout
    while engine.podman("healthcheck", "run", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never healthy:\n{logs(name)}")
        time.sleep(3)


def test_a_task_volume_is_writable_only_where_the_image_declares_it(images, tmp_path):
    """Fargate's bind mount on /tmp is root's 0755, which the images' user 10001 cannot write,
    unless the image declares VOLUME /tmp: then it starts as the image's /tmp, mode 1777."""
    probe = ["sh", "-c", "stat -c '%a %U' /tmp && touch /tmp/written"]
    cases = {"base": stand_ins.STAND_INS["python"], **images}
    for name, image in cases.items():
        folder = new_bind_mount(tmp_path / name)
        expose_declared_volume(image, "/tmp", folder)
        done = engine.podman(
            "run", "--rm", *READ_ONLY, "--user", "10001", "--entrypoint", "",
            "-v", f"{folder}:/tmp", image, *probe, check=False,
        )  # fmt: skip
        if name == "base":  # no VOLUME: as ECS mounts it, nobody but root may write
            assert done.stdout.split() == ["755", "root"]
            assert done.returncode != 0 and "Permission denied" in done.stderr
        else:
            assert done.stdout.split() == ["1777", "root"], (name, done.stdout, done.stderr)
            assert done.returncode == 0 and (folder / "written").exists(), done.stderr


@pytest.mark.timeout(1800)
def test_the_images_run_with_a_read_only_root_as_the_task_definitions_say(images, sample_root):
    box = Containers()
    mlflow = f"mlflow-{box.tag}"
    client = {"MLFLOW_TRACKING_URI": f"http://{mlflow}:5000"}
    try:
        started = box.run(
            mlflow,
            images["mlflow"],
            env={
                "MLFLOW_BACKEND_STORE_URI": "sqlite:////tmp/mlflow.db",
                "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/artifacts",
                "MLFLOW_WORKERS": "1",
                "MLFLOW_SERVER_ALLOWED_HOSTS": f"{mlflow},{mlflow}:*,localhost:*,127.0.0.1:*",
            },
        )
        assert started.returncode == 0, started.stderr
        wait_healthy(mlflow, box.logs)

        # The model image registers the bundled model: downloads, a run, plots, all in /tmp.
        bootstrap = box.run(
            f"bootstrap-{box.tag}", images["model"], "hm-mlflow", "bootstrap",
            env=client, detach=False,
        )  # fmt: skip
        assert bootstrap.returncode == 0, bootstrap.stdout[-2000:] + bootstrap.stderr[-3000:]

        port = free_port()
        webapp = f"webapp-{box.tag}"
        served = box.run(
            webapp,
            images["webapp"],
            "hm-mlflow", "serve", "--host", "0.0.0.0", "--port", "8080",
            env={
                **client,
                "HM_PREDICTIONS_URI": "sqlite:////tmp/predictions.db",
                "HM_FEEDBACK_URI": "/tmp/feedback",
                "HM_WEB_WORKERS": "1",
            },
            ports=[f"127.0.0.1:{port}:8080"],
        )  # fmt: skip
        assert served.returncode == 0, served.stderr
        wait_healthy(webapp, box.logs)
        url = f"http://127.0.0.1:{port}"
        wait_for_version(url, "1", timeout=120, healthy=True)
        film = list_split(sample_root, "test")[0]
        answer = httpx.post(
            f"{url}/api/predict", files={"file": (film.name, film.read_bytes())}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == "1"

        # Nothing was written outside /tmp: the root stayed read-only, the users non-root.
        for name in (mlflow, webapp):
            details = engine.inspect("container", name)
            assert details["HostConfig"]["ReadonlyRootfs"] is True
            assert details["Config"]["User"] == "10001"
            probe = engine.podman("exec", name, "sh", "-c", "touch /opt/x", check=False)
            assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    finally:
        box.close()


def test_image_sizes(images):
    """The sizes the README gives, measured: each image and what it adds to its base."""
    base = engine.image_size_mb(stand_ins.STAND_INS["python"])
    sizes = {name: engine.image_size_mb(image) for name, image in images.items()}
    for name, size in sizes.items():
        print(f"{name}: {size:.0f} MB, {size - base:.0f} MB above the base ({base:.0f} MB)")
    # The webapp's own layers (its virtual environment): a budget that catches a dependency
    # that should not be there (the MLflow server, matplotlib, a second OpenCV).
    assert sizes["webapp"] - base < 500
    assert sizes["webapp"] < sizes["mlflow"] and sizes["webapp"] < sizes["model"]


def aws_clients_opened(package: Path) -> set[str]:
    """The AWS services the package opens a boto3 client on (`.client("s3")`), but for the
    laptop's `hm-mlflow cloud` (cloud.py), which no image runs."""
    opened = set()
    for module in package.rglob("*.py"):
        if module.name != "cloud.py" and "bundled" not in module.parts:
            opened |= set(re.findall(r"\.client\(\s*\"([a-z0-9-]+)\"", module.read_text()))
    return opened


def test_the_webapp_image_keeps_every_aws_api_the_package_calls(images):
    """The webapp image drops botocore's models of the AWS APIs it never calls: it keeps each
    one the package opens a client on, and a client on each of them opens inside it."""
    opened = aws_clients_opened(engine.REPO / "src" / "hm_mlflow")
    assert {"s3", "ecs", "secretsmanager"} <= opened  # the scan finds what is there
    script = (
        "import sys, boto3; s = boto3.session.Session(region_name='us-east-1');"
        "[s.client(n) for n in sys.argv[1:]]; print(' '.join(s.get_available_services()))"
    )
    done = engine.podman(
        "run", "--rm", "--entrypoint", "python", images["webapp"], "-c", script, *sorted(opened),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    kept = set(done.stdout.split())
    assert opened <= kept and len(kept) < 10, kept
