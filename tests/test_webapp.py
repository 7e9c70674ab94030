"""The webapp as a real server (`hm-mlflow serve`) over HTTP, on models from a real registry."""

from __future__ import annotations

import io
import time

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from hm_mlflow.dataset import list_split
from hm_mlflow.readiness import wait_for_every_worker
from hm_mlflow.train import train

from support import free_port, make_settings, serve, stop, wait_for_version

pytestmark = pytest.mark.integration


def post(url: str, data: bytes, name: str = "xray.jpeg", path: str = "/api/predict"):
    return httpx.post(f"{url}{path}", files={"file": (name, data)}, timeout=60)


@pytest.fixture(scope="module")
def xray(sample_root) -> bytes:
    return next(s for s in list_split(sample_root, "test") if s.name.endswith(".jpeg")).read_bytes()


def test_model_appears_and_is_swapped_without_a_restart(mlflow_server, sample_root, tmp_path):
    settings = make_settings(mlflow_server)
    url, process = serve(settings, tmp_path)
    try:
        # No Production model yet: said plainly, on the API and on the page (once the first
        # look at the registry is done; until then a request hears that the model is loading).
        health = wait_for_every_worker(f"{url}/health", lambda h: h["state"] != "loading")
        assert health["model_loaded"] is False and health["state"] == "no_model"
        image = list_split(sample_root, "val")[0].read_bytes()
        refused = post(url, image)
        assert refused.status_code == 503
        assert "No model is in production yet" in refused.json()["detail"]
        assert "No model is in production yet" in httpx.get(url).text

        first = train(sample_root, settings, progress=False)
        wait_for_version(url, first.version)
        answer = post(url, image)
        assert answer.status_code == 200
        assert answer.json()["model"] == {"name": settings.model_name, "version": "1"}

        second = train(sample_root, settings, force=True, progress=False)
        health = wait_for_version(url, second.version)
        assert health["status"] == "ok" and health["state"] == "serving"
        assert post(url, image).json()["model"]["version"] == second.version
    finally:
        stop(process)


def test_api_answers_label_probability_and_model(webapp, trained, sample_root):
    settings, _ = trained
    for sample in list_split(sample_root, "test")[:6]:
        response = post(webapp, sample.read_bytes(), sample.name)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"prediction_id", "site", "label", "probability", "threshold", "model"}
        assert len(body["prediction_id"]) == 32 and body["site"] == "default"
        assert body["label"] in ("NORMAL", "PNEUMONIA")
        assert 0.0 <= body["probability"] <= 1.0
        assert body["model"] == {"name": settings.model_name, "version": "1"}
        threshold = httpx.get(f"{webapp}/health").json()["model"]["threshold"]
        assert body["threshold"] == threshold
        assert (body["label"] == "PNEUMONIA") == (body["probability"] >= threshold)


def test_health_describes_the_served_model(webapp, trained):
    settings, _ = trained
    health = httpx.get(f"{webapp}/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["model"]["name"] == settings.model_name
    assert health["model"]["synthetic"] is True
    assert health["model"]["trained_at"].startswith("20")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (300, 300)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda x: b"", 400, "empty"),
        (lambda x: b"patient: John Doe\nnot an image\n", 415, "not a JPEG, PNG or DICOM"),
        (lambda x: _gif(), 415, "not a JPEG, PNG or DICOM"),
        (lambda x: x[: len(x) // 2], 422, "incomplete"),
        (lambda x: b"\xff\xd8\xff" + bytes(3 * 2**20), 413, "limit of 2 MB"),
        (lambda x: _png(10_000, 10_000), 413, "megapixels"),
        (lambda x: _png(20, 20), 422, "at least 64 pixels"),
    ],
    ids=["empty", "text", "gif", "truncated-jpeg", "too-big", "pixel-bomb", "tiny"],
)
def test_bad_uploads_get_a_clear_4xx(webapp, xray, make, status, words):
    response = post(webapp, make(xray))
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_request_without_a_file_field(webapp):
    response = httpx.post(f"{webapp}/api/predict", data={"image": "x"})
    assert response.status_code == 400
    assert "form field 'file'" in response.json()["detail"]


def test_server_survives_bad_input(webapp, xray):
    statuses = [
        post(webapp, data).status_code
        for data in (b"", b"\x89PNG\r\n\x1a\n" + bytes(100), xray[:1000])
    ]
    assert statuses == [400, 422, 422]
    assert post(webapp, xray).status_code == 200


def test_upload_page_shows_answer_thumbnail_and_model(webapp, trained, xray):
    settings, _ = trained
    page = httpx.get(webapp).text
    assert 'type="file"' in page and 'name="file"' in page
    assert f"<strong>{settings.model_name}</strong>" in page
    assert 'id="model-version">1<' in page
    assert "trained on synthetic images" in page

    result = post(webapp, xray, path="/")
    assert result.status_code == 200
    assert 'id="label">NORMAL<' in result.text or 'id="label">PNEUMONIA<' in result.text
    assert 'src="data:image/png;base64,' in result.text
    assert "Probability of pneumonia" in result.text


def test_upload_page_explains_a_refusal(webapp):
    result = post(webapp, b"hello", name="notes.txt", path="/")
    assert result.status_code == 415
    assert 'id="error"' in result.text and "not a JPEG, PNG or DICOM" in result.text


def test_rgb_and_png_uploads_are_accepted(webapp, xray):
    gray = cv2.imdecode(np.frombuffer(xray, np.uint8), cv2.IMREAD_GRAYSCALE)
    rgb_png = cv2.imencode(".png", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))[1].tobytes()
    gray_jpeg = cv2.imencode(".jpg", gray)[1].tobytes()
    a, b = post(webapp, rgb_png, "x.png").json(), post(webapp, gray_jpeg).json()
    assert a["label"] == b["label"]
    assert abs(a["probability"] - b["probability"]) < 0.05


def test_unreachable_registry_is_reported_not_mistaken_for_no_model(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    # One worker: each worker finds the registry gone on its own first check, so with several
    # a request may reach one that has not looked yet (and says "no model yet", rightly).
    url, process = serve(make_settings(dead), tmp_path, HM_WEB_WORKERS="1")
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["registry_reachable"] is not False:
            assert time.monotonic() < deadline, "the failed registry check was never reported"
            time.sleep(0.3)
        health = httpx.get(f"{url}/health")
        assert health.json()["status"] == "degraded" and health.json()["model_loaded"] is False
        assert dead not in health.text and "Error" not in health.text  # nothing internal
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = post(url, _png(300, 300), "x.png")
        assert refused.status_code == 503
        assert "registry cannot be reached" in refused.json()["detail"]
        assert "registry cannot be reached" in httpx.get(url).text
    finally:
        stop(process)
