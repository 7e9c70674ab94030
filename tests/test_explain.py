"""Occlusion maps: right on a model whose answer we know, exact on the served model, and the
API route that serves them beside /api/predict."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import cv2
import httpx
import mlflow
import numpy as np
import pytest

from hm_mlflow import features
from hm_mlflow.dataset import list_split
from hm_mlflow.explain import CAPTION, NotExplainable, occlusion


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_the_map_lights_up_the_region_the_model_reads_and_nothing_else():
    """A model that answers the mean brightness of one canvas region: hiding any patch that
    overlaps it lowers the answer, hiding any other patch changes nothing."""
    rng = np.random.default_rng(0)
    film = rng.integers(60, 120, (512, 512), dtype=np.uint8)  # textured: nothing to crop
    film[128:256, 256:384] = 250  # canvas rows 64-127, columns 128-191 at 256 px
    region = (slice(64, 128), slice(128, 192))
    model = SimpleNamespace(
        features=SimpleNamespace(
            load=features.load,
            to_canvas=features.to_canvas,
            from_image=lambda canvas: np.array([canvas[region].mean() / 255.0]),
        ),
        probability=lambda vectors: np.asarray(vectors)[:, 0],
    )
    explanation = occlusion(model, _png(film), patch=32, stride=16)
    values = explanation.values
    assert values.shape == (15, 15)
    starts = np.arange(15) * 16
    overlaps_rows = (starts + 32 > 64) & (starts < 128)
    overlaps_cols = (starts + 32 > 128) & (starts < 192)
    touching = np.outer(overlaps_rows, overlaps_cols)
    assert np.all(values[~touching] == 0)
    assert np.all(values[touching] > 0)
    # a patch entirely inside the region hides a quarter of it: the largest change
    assert np.unravel_index(values.argmax(), values.shape) in {(4, 8), (4, 9), (5, 8), (5, 9)}
    overlay = explanation.overlay()
    assert overlay.shape == (256, 256, 3)
    red, blue = overlay[96, 160], overlay[10, 10]
    assert red[2] > red[0]  # BGR: red over the region
    assert blue[0] == blue[1] == blue[2]  # untouched: the grey film, no colour


def test_a_model_without_its_feature_code_cannot_be_explained():
    with pytest.raises(NotExplainable):
        occlusion(SimpleNamespace(probability=lambda v: v), b"")


@pytest.fixture(scope="module")
def served_model(trained):
    settings, _ = trained
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/1")
    return model.unwrap_python_model()


def test_the_map_of_the_served_model_starts_from_its_own_answer(served_model, sample_root):
    film = next(s for s in list_split(sample_root, "test") if s.label == 1)
    data = Path(film.location).read_bytes()
    probability, _ = served_model.classify(data)
    explanation = occlusion(served_model, data)
    # the same canvas, the same features (OpenCV's float code may differ in the last bits)
    assert explanation.probability == pytest.approx(probability, abs=1e-9)
    assert explanation.values.shape == (15, 15)
    assert np.abs(explanation.values).max() > 1e-3  # some region matters to this model


def test_the_api_explains_the_served_version(webapp, sample_root):
    film = next(s for s in list_split(sample_root, "test") if s.label == 0)
    data = Path(film.location).read_bytes()
    predicted = httpx.post(f"{webapp}/api/predict", files={"file": data}).json()
    response = httpx.post(f"{webapp}/api/explain", files={"file": data}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    for key in ("label", "threshold", "model"):
        assert body[key] == predicted[key]
    assert body["probability"] == pytest.approx(predicted["probability"], abs=1e-9)
    occluded = body["occlusion"]
    assert (occluded["rows"], occluded["cols"], occluded["patch"], occluded["stride"]) == (
        15,
        15,
        32,
        16,
    )
    assert np.array(occluded["values"]).shape == (15, 15)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["overlay_png"]), np.uint8), 1)
    assert overlay.shape == (256, 256, 3)
    assert body["caption"] == CAPTION


def test_the_api_refuses_bad_files_as_predict_does(webapp):
    for data in (b"not an x-ray", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40):
        predicted = httpx.post(f"{webapp}/api/predict", files={"file": data})
        explained = httpx.post(f"{webapp}/api/explain", files={"file": data})
        assert 400 <= explained.status_code < 500
        assert (explained.status_code, explained.json()) == (
            predicted.status_code,
            predicted.json(),
        )
    assert httpx.post(f"{webapp}/api/explain").status_code == 400


def test_predict_adds_the_thumbnail_only_when_asked(webapp, sample_root):
    film = list_split(sample_root, "test")[0]
    data = Path(film.location).read_bytes()
    plain = httpx.post(f"{webapp}/api/predict", files={"file": data}).json()
    with_thumbnail = httpx.post(
        f"{webapp}/api/predict", params={"thumbnail": "true"}, files={"file": data}
    ).json()
    assert "thumbnail" not in plain
    assert with_thumbnail["thumbnail"].startswith("data:image/png;base64,")
    assert with_thumbnail["probability"] == pytest.approx(plain["probability"], abs=1e-9)


def test_maps_beyond_the_queue_are_refused_as_busy_and_predictions_go_on(webapp, sample_root):
    """Each worker makes one map at a time and holds one more; the rest are told to come back
    (503, Retry-After, a sentence), while /api/predict keeps answering."""
    film = list_split(sample_root, "test")[1]
    data = Path(film.location).read_bytes()
    workers = os.cpu_count() or 1  # the webapp fixture: one per core
    with ThreadPoolExecutor(4 * workers + 1) as pool:
        maps = [
            pool.submit(httpx.post, f"{webapp}/api/explain", files={"file": data}, timeout=60)
            for _ in range(4 * workers)
        ]
        predicted = pool.submit(httpx.post, f"{webapp}/api/predict", files={"file": data})
        answers = [future.result() for future in maps]
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    busy = [answer for answer in answers if answer.status_code == 503]
    assert busy, statuses
    assert all("heat maps" in answer.json()["detail"] for answer in busy)
    assert all(answer.headers["Retry-After"] == "1" for answer in busy)
    assert predicted.result().status_code == 200
