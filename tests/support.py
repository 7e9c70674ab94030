"""Helpers for the tests: ports, processes, settings, the browser."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest

from hm_mlflow.config import Settings
from hm_mlflow.embedded import port_free
from hm_mlflow.readiness import wait_for_every_worker

BIN = Path(sys.executable).parent
NOTEBOOK = Path(__file__).resolve().parents[1] / "jupyter" / "training_notebook.ipynb"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    url: str, process: subprocess.Popen, timeout: float = 120, ready=None
) -> httpx.Response:
    """Poll `url` until it answers 200 (and `ready(response)`), failing fast if `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200 and (ready is None or ready(response)):
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal a process started with start_new_session=True, and its group; return its code."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # anything left behind in its group
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def start(
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd=None, ignore_sigint=False
) -> subprocess.Popen:
    """Start a process in a new session, output to `log`. `ignore_sigint` starts it the way a
    shell starts a background job: with SIGINT ignored."""
    handle = log.open("ab")
    return subprocess.Popen(
        argv,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if ignore_sigint
        else None,
    )


# A test's training: small CV, one augmented copy per image, two epochs per trunk (the defaults
# cost time and exercise nothing more). As environment variables, for the tests that run the
# images, a task or the notebook; make_settings takes the same values.
QUICK_TRAINING = {"HM_CV_FOLDS": "3", "HM_AUGMENT_COPIES": "1", "HM_TRUNK_EPOCHS": "2"}


def make_settings(tracking_uri: str, **overrides) -> Settings:
    """Settings for one test: its own model name, QUICK_TRAINING, the given MLflow, and a state
    folder of its own (its prediction log and kept films: never the checkout's .state/)."""
    import tempfile

    values = {
        "model_name": f"cxr-{uuid.uuid4().hex[:8]}",
        **{key.removeprefix("HM_").lower(): value for key, value in QUICK_TRAINING.items()},
        "workers": 2,
        "state_dir": Path(tempfile.mkdtemp(prefix="hm-test-state-")),
        "MLFLOW_TRACKING_URI": tracking_uri,
        **overrides,
    }
    return Settings(**values)


def run_hm_mlflow(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600, inherit_env: bool = True
) -> subprocess.CompletedProcess:
    """Run the `hm-mlflow` console script to completion, output captured. `env` is added to this
    process's environment, or with `inherit_env=False` is the whole environment."""
    return subprocess.run(
        [str(BIN / "hm-mlflow"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if inherit_env else env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def require_chromium() -> str:
    """Path of Debian's Chromium; a skip on a developer machine without it, an error in CI."""
    path = "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


def serve(settings, tmp_path: Path, **env) -> tuple[str, subprocess.Popen]:
    """Start `hm-mlflow serve` for `settings`' model on a free port; (url, process). Its log
    (one JSON line per request among uvicorn's lines) is tmp_path/webapp-PORT.log."""
    port = free_port()
    process = start(
        [str(BIN / "hm-mlflow"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        tmp_path / f"webapp-{port}.log",
        {
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "HM_MODEL_NAME": settings.model_name,
            "HM_REFRESH_SECONDS": "1",
            "HM_STATE_DIR": str(settings.state_dir),
            **env,
        },
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health", process, timeout=60)
    return url, process


def wait_for_version(url: str, version: str, timeout: float = 60, healthy: bool = False) -> dict:
    """Wait until every worker of the webapp at `url` serves `version`, and with `healthy` says
    "ok" too (a worker whose last registry call failed says "degraded" until its next refresh
    succeeds); its last /health."""

    def serving(health) -> bool:
        if not isinstance(health, dict) or (healthy and health["status"] != "ok"):
            return False
        return (health["model"] or {}).get("version") == version

    return wait_for_every_worker(f"{url}/health", serving, timeout)


S3_KEY, S3_SECRET = "hm-test-key", "hm-test-secret-key"


def s3_client(endpoint: str):
    """A boto3 S3 client for the test S3 server at `endpoint`."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def free_port_pair() -> int:
    """A free port whose +10000 twin (SeaweedFS's gRPC port for it) is free too."""
    while True:
        port = random.randint(20000, 45000)
        if all(port_free("127.0.0.1", p) for p in (port, port + 10000)):
            return port


def seaweed_argv(state: Path, s3_port: int, ports: dict[str, int], bind: str = "127.0.0.1"):
    """`weed mini` persisting to `state`, its S3 API on `s3_port` and its other servers
    (master, volume, filer, ...) on `ports`, listening on `bind`."""
    return [
        str(BIN / "weed"),
        "mini",
        f"-dir={state}",
        "-ip=127.0.0.1",
        f"-ip.bind={bind}",
        "-master.telemetry=false",
        "-admin.ui=false",
        f"-s3.port={s3_port}",
        *(f"-{part}.port={port}" for part, port in sorted(ports.items())),
    ]


def start_seaweed(
    state: Path, port: int, key: str = S3_KEY, secret: str = S3_SECRET
) -> subprocess.Popen:
    """SeaweedFS as the S3 API (MinIO's stand-in on these machines), persisting to `state`, on
    free ports throughout (its defaults include 8888 and 9333, often taken)."""
    state.mkdir(parents=True, exist_ok=True)
    ports = {part: free_port_pair() for part in ("master", "volume", "filer", "webdav")}
    return start(
        seaweed_argv(state, port, ports),
        state / "weed.log",
        {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
    )


def start_s3(state: Path) -> tuple[subprocess.Popen, str]:
    """SeaweedFS (`start_seaweed`) on a free port, once its S3 API answers: (process, endpoint)."""
    port = free_port_pair()
    process = start_seaweed(state, port)
    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            return process, endpoint
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                stop(process)
                raise
            time.sleep(0.5)


def s3_env(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET) -> dict[str, str]:
    """The environment a boto3 client (and so `hm_mlflow.dataset`) needs for `endpoint`."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def executed_text(path: Path) -> str:
    """Every text output (streams, Markdown, plain text, HTML tables) of an executed notebook."""
    notebook = json.loads(path.read_text())
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append("".join(output["text"]))
            for kind in ("text/markdown", "text/plain"):
                if kind in output.get("data", {}):
                    parts.append("".join(output["data"][kind]))
    return "\n".join(parts)


def request_log(url: str, tmp_path: Path) -> list[dict]:
    """The JSON request lines `serve` wrote so far for the server at `url`."""
    port = url.rsplit(":", 1)[1]
    lines = (tmp_path / f"webapp-{port}.log").read_text(errors="replace").splitlines()
    found = []
    for line in lines:
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(line))
    return found


def tamper(settings, version: str, path: str, content: bytes | None = None) -> None:
    """Change (or, with no `content`, delete) one file of a registered version in the artifact
    store, as anyone holding the store's keys could."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(settings.tracking_uri)
    uri = MlflowClient(settings.tracking_uri).get_model_version_download_uri(
        settings.model_name, version
    )
    repo = get_artifact_repository(uri)
    if content is None:
        repo.delete_artifacts(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_bytes(content)
        parent = str(Path(path).parent)
        repo.log_artifact(str(local), None if parent == "." else parent)


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        if process.poll() is not None:
            raise AssertionError(
                f"exited with {process.returncode} before {text!r}:\n{content[-3000:]}"
            )
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not printed after {timeout} s:\n{log.read_text()[-3000:]}")


def processes_mentioning(needle: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                found.append(cmdline)
    return found


def ctrl_c(process: subprocess.Popen) -> int:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(60)


def raw_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grayscale PNG built by hand: the header says width x height, the image data is
    `idat` as given (compressed rows, or too few of them), so hostile files can be made."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def wait_until(found, timeout: float = 30):
    """`found()`'s first true answer within `timeout` seconds (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = found()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("not found in time")
        time.sleep(0.5)


LOGGED_SCRIPT = (
    "import json, sys; from hm_mlflow.config import get_settings; "
    "from hm_mlflow.monitoring.store import PredictionLog; "
    "row = PredictionLog(get_settings().prediction_log_uri).get(sys.argv[1]); "
    "print(json.dumps(row and {k: v for k, v in row.items() if k != 'summary'}, default=str))"
)


def logged(ns, env: dict, prediction_id: str) -> dict | None:
    """A row of the prediction log (its summary left out), read inside the network namespace
    `ns` with a service's own settings `env` (the database answers only there)."""
    done = subprocess.run(
        ns.argv([str(BIN / "python"), "-c", LOGGED_SCRIPT, prediction_id]),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
