"""The container engine of the tests: podman (Debian's), its settings on these machines, and
the build of the project's images from their Dockerfiles as they are.

Nothing here re-implements an engine: it runs `podman` and reads what it answers. The settings
are those "Containers on these machines" in ../shared/NOTES.md found to work as root here
(runc, cgroupfs, netavark, no default ulimits); .ci/run writes them, `configure()` checks them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
SETTINGS = """\
# Written by hm-mlflow's .ci/run: podman as root on a machine without a Docker daemon
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
[network]
network_backend = "netavark"
"""
# The machine's CA bundle and pip settings, copied into every container and build step (the
# copy is never committed to an image): pip inside a build reaches PyPI through this machine's
# network as pip outside does.
MOUNTS_CONF = Path("/etc/containers/mounts.conf")
MOUNTS = [path for path in ("/etc/ssl/certs", "/etc/pip.conf") if Path(path).exists()]
# `podman build` here: chroot isolation (the OCI one needs cgroups this machine does not
# delegate), Docker's image format (OCI drops HEALTHCHECK), local images only (no registry is
# reachable).
BUILD_ARGS = ["--isolation", "chroot", "--format", "docker", "--pull=never"]
# The project's images, as docker-compose.yaml and the ECS task definitions name them
IMAGES = {
    "mlflow": "mlflow/Dockerfile-mlflow",
    "webapp": "webapp/Dockerfile-webapp",
    "model": "model/Dockerfile-model",
    "create-buckets": "minio/Dockerfile-buckets",
    "jupyter": "jupyter/Dockerfile-jupyter",
}
TAG = "dev"


def configure() -> None:
    """This machine's podman settings (SETTINGS, MOUNTS), written where they are missing.
    A podman that has run on CNI is reset onto netavark, which deletes its images."""
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    if not CONTAINERS_CONF.exists() or "cgroupfs" not in CONTAINERS_CONF.read_text():
        if CONTAINERS_CONF.exists():
            CONTAINERS_CONF.rename(CONTAINERS_CONF.with_suffix(".conf.orig"))
        CONTAINERS_CONF.write_text(SETTINGS)
    present = MOUNTS_CONF.read_text().split() if MOUNTS_CONF.exists() else []
    with MOUNTS_CONF.open("a") as mounts:
        for path in MOUNTS:
            if f"{path}:{path}" not in present:
                mounts.write(f"{path}:{path}\n")
    backend = podman("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip()
    if backend != "netavark":
        print(f"podman runs on {backend}: resetting it onto netavark")
        podman("system", "reset", "--force")


def missing() -> str | None:
    """Why the engine cannot run here, or None."""
    for tool in ("podman", "mmdebstrap", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    if not CONTAINERS_CONF.exists() or "cgroupfs" not in CONTAINERS_CONF.read_text():
        return f"{CONTAINERS_CONF} lacks this machine's settings (.ci/run writes them)"
    present = MOUNTS_CONF.read_text().split() if MOUNTS_CONF.exists() else []
    if any(f"{path}:{path}" not in present for path in MOUNTS):
        return f"{MOUNTS_CONF} lacks this machine's settings (.ci/run writes them)"
    return None


def require(reason: str | None) -> None:
    """Skip a test that needs the engine when `reason` says it cannot run here; in CI, where
    .ci/run provides the engine, fail it instead."""
    import pytest

    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the container tests must run in CI: {reason}")
        pytest.skip(reason)


def podman(
    *args: str, check: bool = True, timeout: float = 1800, **kwargs
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed:\n{done.stderr[-4000:]}")
    return done


def inspect(kind: str, name: str) -> dict | None:
    """`podman KIND inspect NAME` as a dict, or None when there is no such object."""
    done = podman(kind, "inspect", name, check=False)
    return json.loads(done.stdout)[0] if done.returncode == 0 else None


def image_label(name: str, label: str) -> str | None:
    found = inspect("image", name)
    return ((found or {}).get("Labels") or {}).get(label) if found else None


def build(tag: str, dockerfile: Path, context: Path, *extra: str) -> None:
    wheels = torch_wheels()
    if wheels:
        extra = ("--build-arg", f"TORCH_WHEELS={wheels}", *extra)
    podman("build", *BUILD_ARGS, *extra, "-f", str(dockerfile), "-t", tag, str(context))


TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"


@functools.cache
def torch_wheels() -> str | None:
    """Where a build on this machine finds PyTorch's CPU wheel (the model and jupyter images'
    TORCH_WHEELS): the local wheel folder pip uses here, served over HTTP on loopback, which a
    build reaches (chroot isolation runs on the host's network). None where there is no such
    folder: the Dockerfiles' default, PyTorch's index, applies."""
    import http.server
    import threading

    folders = [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]
    folder = next((f for f in folders if list(Path(f).glob(TORCH_WHEEL))), None)
    if folder is None:
        return None

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def project_image(name: str) -> str:
    return f"localhost/hm-mlflow/{name}:{TAG}"


def stages(dockerfile: Path) -> list[str]:
    """The named stages of a Dockerfile (`FROM ... AS name`), in order."""
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.I | re.M)


def build_project_images(names: list[str] | None = None) -> dict[str, str]:
    """Build the project's images from the repository root, as `docker compose build` does;
    returns name -> image. Layers are cached by podman between calls, and between these builds
    and compose's (the same layers, whichever API asked)."""
    built = {}
    for name in names or list(IMAGES):
        dockerfile = REPO / IMAGES[name]
        # Each named stage (the venv's `build`) tagged too: an untagged stage is a dangling
        # image, and the prune below would take the cache of every later build with it.
        for stage in stages(dockerfile):
            build(project_image(f"{name}-{stage}"), dockerfile, REPO, "--target", stage)
        build(project_image(name), dockerfile, REPO)
        built[name] = project_image(name)
    # What these tags named before, untagged by the new builds: several GB a run once the code
    # changes, which fill a developer's disk in a few runs. The current images and their
    # stages, which the next build reuses, are tagged and stay.
    podman("image", "prune", "--force", check=False)
    return built


def image_size_mb(image: str) -> float:
    return (inspect("image", image) or {}).get("Size", 0) / 1e6
