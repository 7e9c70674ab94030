"""Serving that holds: limits from the header and while the body streams in, DICOM, admission
under load, withdrawal, a registry that goes away, a swap while clients post, logs and metrics.
Every test drives `hm-mlflow serve` (two workers) over HTTP."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import cv2
import httpx
import mlflow
import numpy as np
import pytest
import skops.io
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from hm_mlflow import features
from hm_mlflow.dataset import list_split
from hm_mlflow.embedded import MLFLOW_SERVER_ENV, mlflow_server_command
from hm_mlflow.serve.app import create_app
from hm_mlflow.serve.model_holder import SERVING, ModelHolder, ServingModel
from hm_mlflow.train import train

from dicom_files import make_dicom, ramp
from support import (
    free_port,
    make_settings,
    raw_png,
    request_log,
    serve,
    start,
    stop,
    wait_for,
    wait_for_version,
)

pytestmark = pytest.mark.integration


def post(url: str, data: bytes, name: str = "film", **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/api/predict", files={"file": (name, data)}, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """Two workers on the session's trained model, 8 MB uploads."""
    settings, _ = trained
    logs = tmp_path_factory.mktemp("serving")
    url, process = serve(settings, logs, HM_MAX_UPLOAD_MB="8", HM_WEB_WORKERS="2")
    wait_for_version(url, "1")
    yield url, logs
    stop(process)


@pytest.fixture(scope="module")
def film(sample_root) -> bytes:
    return next(s for s in list_split(sample_root, "test") if s.name.endswith(".jpeg")).read_bytes()


def png(width: int, height: int, noise: bool = False) -> bytes:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8)
    else:
        pixels = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return cv2.imencode(".png", pixels)[1].tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a bomb's shape)."""
    import zlib

    return raw_png(width, height, zlib.compress(b"\0" * 1000))


def many_scans(film: bytes, scans: int) -> bytes:
    """A progressive JPEG with `scans` extra scan headers before its end."""
    image = Image.open(io.BytesIO(film)).convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    return (
        data[:-2] + (b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 16) * scans + data[-2:]
    )


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda film: png(64, 1000), 422, "elongated"),
        (lambda film: png_header_only(64, 781_000), 413, "megapixels"),
        (lambda film: png_header_only(7000, 7000), 413, "megapixels"),
        (lambda film: many_scans(film, 100), 422, "scans"),
        (lambda film: film[:-2] + b"\0\0", 422, "incomplete"),
        (lambda film: png(300, 300)[:-12], 422, "incomplete"),
    ],
    ids=["aspect", "tall-png", "pixel-bomb", "progressive-scans", "jpeg-no-eoi", "png-no-iend"],
)
def test_limits_are_read_from_the_header(server, film, make, status, words):
    url, _ = server
    answer = post(url, make(film))
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_a_png_bomb_within_the_pixel_limit_gets_a_4xx_not_a_crash(server):
    url, _ = server
    answer = post(url, png_header_only(5000, 5000))  # 25 MP declared, 1 KB of data
    assert answer.status_code == 422
    assert httpx.get(f"{url}/health").json()["model_loaded"] is True


def test_dicom_films_are_read_like_a_viewer_shows_them(server, film):
    url, _ = server
    gray = cv2.imdecode(np.frombuffer(film, np.uint8), cv2.IMREAD_GRAYSCALE)
    as_jpeg = post(url, film).json()
    # the same film as a 12-bit MONOCHROME1 DICOM with a window that shows it all
    stored = (4095 - gray.astype(np.uint16) * 16).astype(np.uint16)
    dicom = make_dicom(stored, photometric="MONOCHROME1", bits_stored=12, center=2048, width=4096)
    as_dicom = post(url, dicom, "film.bin")  # the name says nothing: the preamble does
    assert as_dicom.status_code == 200, as_dicom.text
    assert as_dicom.json()["label"] == as_jpeg["label"]
    assert abs(as_dicom.json()["probability"] - as_jpeg["probability"]) < 0.1

    refused = post(url, make_dicom(ramp(), syntax=JPEG2000Lossless), "film.dcm")
    assert refused.status_code == 415
    assert "JPEG 2000" in refused.json()["detail"] and str(JPEG2000Lossless) in refused.text
    broken = post(url, make_dicom(ramp(), drop=("Rows",)), "film.dcm")
    assert broken.status_code == 422 and "no Rows" in broken.json()["detail"]


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 5000000000\r\n\r\n"
        )
        status_line = sock.recv(4096).split(b"\r\n")[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_a_streamed_body_is_cut_off_at_the_limit(server):
    """No Content-Length: counted as it arrives; the answer is a 413 with a sentence."""
    url, _ = server
    envelope = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    sent = {"bytes": 0}

    def body():
        yield envelope
        for _ in range(40):  # 40 MB, over the 8 MB limit
            sent["bytes"] += 2**20
            yield b"\0" * 2**20

    try:
        answer = httpx.post(
            f"{url}/api/predict",
            content=body(),
            timeout=60,
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
    except httpx.HTTPError:  # the server may close while the client still sends
        return
    assert answer.status_code == 413
    assert "limit of 8 MB" in answer.json()["detail"]


def test_health_ready_metrics_and_one_json_line_per_request(server, film, trained):
    url, logs = server
    settings, _ = trained
    assert post(url, film).status_code == 200
    assert post(url, b"not an image").status_code == 415
    health = httpx.get(f"{url}/health")
    assert health.json()["status"] == "ok" and health.json()["state"] == SERVING
    assert settings.tracking_uri not in health.text and "Error" not in health.text
    assert httpx.get(f"{url}/ready").status_code == 200

    metrics = httpx.get(f"{url}/metrics").text
    for name in (
        'hm_requests_total{outcome="ok",route="/api/predict"}',
        'hm_rejections_total{reason="unsupported_type"}',
        "hm_request_seconds_bucket",
        "hm_images_in_flight",
    ):
        assert name in metrics, name
    assert metrics.count("hm_model_version{") >= 2  # both workers say which version they serve
    assert 'version="1"} 1.0' in metrics

    lines = [line for line in request_log(url, logs) if line["route"] == "/api/predict"]
    assert {"ok", "unsupported_type"} <= {line["outcome"] for line in lines}
    for line in lines:
        assert set(line) == {
            "time",
            "method",
            "route",
            "status",
            "latency_ms",
            "upload_bytes",
            "model_version",
            "outcome",
            "worker",
        }
    ok = next(line for line in lines if line["outcome"] == "ok")
    assert ok["model_version"] == "1" and ok["upload_bytes"] > len(film)
    assert len({line["worker"] for line in request_log(url, logs)}) >= 1


def test_served_probability_equals_features_fed_to_the_estimator(
    server, trained, sample_root, tmp_path
):
    url, _ = server
    settings, _ = trained
    mlflow.set_tracking_uri(settings.tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{settings.model_name}/1", dst_path=str(tmp_path)
        )
    )
    path = next(local.rglob("estimator.skops"))
    estimator = skops.io.load(path, trusted=skops.io.get_untrusted_types(file=str(path)))
    trunk = features.Trunk(next(local.rglob("trunk.onnx")).read_bytes())
    for sample in list_split(sample_root, "test")[:8]:
        data = sample.read_bytes()
        expected = estimator.predict_proba(features.extract(data, trunk)[np.newaxis])[0, 1]
        assert post(url, data, sample.name).json()["probability"] == pytest.approx(
            expected, abs=1e-6
        )


def test_a_full_worker_answers_busy_at_once(trained, tmp_path):
    """One image at a time per worker: large images posted together get 503 + Retry-After
    beyond that, every other one its answer; nothing waits in a queue."""
    settings, _ = trained
    url, process = serve(
        settings, tmp_path, HM_MAX_IN_FLIGHT="1", HM_WEB_WORKERS="2", HM_MAX_UPLOAD_MB="16"
    )
    try:
        wait_for_version(url, "1")
        big = png(4000, 3000)  # 24 MB decoded: classified in a thread, long enough to overlap
        answers = []

        def one():
            answers.append(post(url, big))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for busy in (a for a in answers if a.status_code == 503):
            assert busy.headers["Retry-After"] == "1"
            assert "busy" in busy.json()["detail"]
        assert 'hm_rejections_total{reason="busy"}' in httpx.get(f"{url}/metrics").text
    finally:
        stop(process)


def test_a_failure_inside_the_model_is_a_503_with_a_sentence(trained, film):
    settings, _ = trained

    def broken(image):
        raise RuntimeError("weights are NaN")

    holder = ModelHolder(settings.model_name, settings.model_alias, settings.tracking_uri)
    holder._current = ServingModel(
        model=None,
        name="m",
        version="7",
        trained_at=None,
        synthetic=False,
        threshold=0.5,
        fast=broken,
    )
    holder.refresh = lambda: False
    with TestClient(create_app(settings, holder)) as client:
        answer = client.post("/api/predict", files={"file": ("x.jpeg", film)})
    assert answer.status_code == 503
    assert (
        answer.json()["detail"]
        == "The model failed on this image; try again, or try another image."
    )
    assert "NaN" not in answer.text


def test_withdrawing_the_alias_stops_the_answers(mlflow_server, sample_root, tmp_path, film):
    settings = make_settings(mlflow_server)
    train(sample_root, settings, progress=False)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="2")
    try:
        wait_for_version(url, "1")
        assert post(url, film).status_code == 200
        MlflowClient(settings.tracking_uri).delete_registered_model_alias(
            settings.model_name, settings.model_alias
        )
        deadline = time.monotonic() + 10
        answers = []
        while time.monotonic() < deadline:
            answers = [post(url, film) for _ in range(6)]  # both workers, surely
            if all(a.status_code == 503 for a in answers):
                break
            time.sleep(0.5)
        assert all(a.status_code == 503 for a in answers), [a.status_code for a in answers]
        assert "withdrawn" in answers[0].json()["detail"]
        assert httpx.get(f"{url}/health").json()["state"] == "withdrawn"
        assert httpx.get(f"{url}/ready").status_code == 503
    finally:
        stop(process)


def test_registry_gone_keeps_the_model_in_service(sample_root, tmp_path, film):
    """MLflow stops: the model stays in service and /health says degraded."""
    from hm_mlflow.config import Settings

    port = free_port()
    state = tmp_path / "mlflow"
    own = Settings(mlflow_host="127.0.0.1", mlflow_port=port, state_dir=state)
    registry = start(mlflow_server_command(own), tmp_path / "mlflow.log", MLFLOW_SERVER_ENV)
    url = None
    try:
        wait_for(f"http://127.0.0.1:{port}/health", registry)
        settings = make_settings(f"http://127.0.0.1:{port}")
        train(sample_root, settings, progress=False)
        url, webapp = serve(settings, tmp_path, HM_WEB_WORKERS="2", HM_REGISTRY_TIMEOUT="2")
        wait_for_version(url, "1")
        stop(registry)
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").json()["status"] != "degraded":
            assert time.monotonic() < deadline, "the lost registry was never reported"
            time.sleep(0.5)
        answers = [post(url, film) for _ in range(6)]
        assert all(a.status_code == 200 and a.json()["model"]["version"] == "1" for a in answers)
        assert httpx.get(f"{url}/ready").status_code == 200
        stop(webapp)
    finally:
        stop(registry)


def test_a_swap_under_load_fails_no_request(mlflow_server, sample_root, tmp_path, film):
    """8 clients post continuously to 2 workers while the alias moves to a new version: no
    request fails, and within the refresh interval (plus the load) every worker answers with
    the new version."""
    settings = make_settings(mlflow_server)
    train(sample_root, settings, progress=False)
    second = train(sample_root, settings, promote=False, progress=False)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="2", HM_REFRESH_SECONDS="1")
    results, stop_clients = [], threading.Event()

    def client():
        with httpx.Client(timeout=60) as session:
            while not stop_clients.is_set():
                answer = session.post(f"{url}/api/predict", files={"file": ("x.jpeg", film)})
                version = (
                    answer.json().get("model", {}).get("version")
                    if (answer.status_code == 200)
                    else None
                )
                results.append((time.monotonic(), answer.status_code, version))

    try:
        wait_for_version(url, "1")
        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        swapped_at = time.monotonic()
        MlflowClient(settings.tracking_uri).set_registered_model_alias(
            settings.model_name, settings.model_alias, second.version
        )
        time.sleep(8)
        stop_clients.set()
        for thread in threads:
            thread.join()
    finally:
        stop(process)
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    assert len(results) > 100
    settled = swapped_at + 1 + 4  # one refresh interval, and the load of the new version
    late = [version for at, _, version in results if at > settled]
    assert late and set(late) == {second.version}
    workers = {}
    for line in request_log(url, tmp_path):
        if line["route"] == "/api/predict" and line["status"] == 200:
            workers.setdefault(line["worker"], []).append(line["model_version"])
    assert len(workers) == 2, "both workers answered"
    for versions in workers.values():
        assert versions[-1] == second.version  # each worker ended on the new version
        assert "1" in versions  # and had served the old one before


def test_worker_memory_stays_bounded_whatever_is_posted(trained, tmp_path):
    """8 clients post the costliest uploads the limits allow (a 36 MP PNG, a 16 MP 12-bit
    DICOM, a PNG whose data inflates to 25 MB): each worker's resident memory grows by at most
    the decode budget (or the one image larger than it) and 64 MB of slack."""
    import psutil
    from test_fuzz import _png_bomb

    from dicom_files import make_dicom

    settings, _ = trained
    budget_mb = 128
    url, process = serve(
        settings,
        tmp_path,
        HM_WEB_WORKERS="2",
        HM_MAX_UPLOAD_MB="32",
        HM_DECODE_BUDGET_MB=str(budget_mb),
    )
    big_png = png(6000, 6000)
    pixels = np.random.default_rng(0).integers(0, 4095, (4000, 4000)).astype(np.uint16)
    big_dicom = make_dicom(pixels, bits_stored=12)
    largest_mb = (2 * len(big_dicom) + 6 * pixels.size) / 2**20  # its admission cost
    try:
        wait_for_version(url, "1")
        workers = psutil.Process(process.pid).children(recursive=True)
        base = {w.pid: w.memory_info().rss for w in workers}
        peak, done = dict(base), threading.Event()

        def sample():
            while not done.is_set():
                for worker in workers:
                    peak[worker.pid] = max(peak[worker.pid], worker.memory_info().rss)
                time.sleep(0.005)

        statuses = []

        def client(data):
            with httpx.Client(timeout=120) as session:
                for _ in range(4):
                    answer = session.post(f"{url}/api/predict", files={"file": ("x", data)})
                    statuses.append(answer.status_code)

        sampler = threading.Thread(target=sample)
        sampler.start()
        mix = [big_png, big_dicom, _png_bomb()] * 3
        threads = [threading.Thread(target=client, args=(data,)) for data in mix[:8]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        sampler.join()
    finally:
        stop(process)
    assert set(statuses) <= {200, 503} and 200 in statuses
    growth = {pid: (peak[pid] - base[pid]) / 2**20 for pid in base}
    bound = max(budget_mb, largest_mb) + 64
    print(f"peak growth per worker (MB): {growth}, bound {bound:.0f} MB")
    assert max(growth.values()) <= bound, growth


def test_a_model_altered_in_the_store_is_not_loaded(mlflow_server, sample_root, tmp_path, film):
    """Models are code: a version whose files changed after registration is refused, the one
    in service stays, and /health says why."""
    from support import tamper

    settings = make_settings(mlflow_server)
    first = train(sample_root, settings, progress=False)
    second = train(sample_root, settings, promote=False, progress=False)
    tamper(settings, second.version, "model_code.py", b"import os\nos.system('echo owned')\n")
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="2")
    try:
        wait_for_version(url, first.version)
        MlflowClient(settings.tracking_uri).set_registered_model_alias(
            settings.model_name, settings.model_alias, second.version
        )
        deadline = time.monotonic() + 30
        while not (health := httpx.get(f"{url}/health").json())["refused"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.5)
        assert health["status"] == "degraded"
        assert health["refused"]["version"] == second.version
        assert (
            "do not match the checksums recorded at registration (model_code.py)"
            in health["refused"]["reason"]
        )
        assert health["model"]["version"] == first.version  # still in service
        assert post(url, film).json()["model"]["version"] == first.version
    finally:
        stop(process)
