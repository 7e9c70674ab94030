"""Malformed requests by the thousand against `hm-mlflow serve` (two workers): no 5xx other than
a 503 with a sentence, no stack trace, no worker death. Hypothesis draws the requests from the
routes of the app's own OpenAPI schema and from mutations of real films, JPEG, PNG and DICOM."""

from __future__ import annotations

import io
import zlib

import cv2
import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hm_mlflow.dataset import list_split

from dicom_files import make_dicom, ramp
from support import raw_png, serve, stop, wait_for_version

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    settings_, _ = trained
    url, process = serve(
        settings_, tmp_path_factory.mktemp("fuzz"), HM_WEB_WORKERS="2", HM_MAX_UPLOAD_MB="4"
    )
    wait_for_version(url, "1")
    workers = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, process, workers
    stop(process)


@pytest.fixture(scope="module")
def seeds(sample_root) -> list[bytes]:
    """Valid uploads to mutate: a JPEG, a PNG, a progressive JPEG and a DICOM film."""
    jpeg = next(s for s in list_split(sample_root, "val") if s.name.endswith(".jpeg"))
    data = jpeg.read_bytes()
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    progressive = io.BytesIO()
    Image.fromarray(gray).save(progressive, format="JPEG", progressive=True)
    return [
        data,
        cv2.imencode(".png", gray)[1].tobytes(),
        progressive.getvalue(),
        make_dicom(ramp(300, 300)),
    ]


def check(answer: httpx.Response) -> None:
    """A 4xx, a 2xx, or a 503 with a sentence: never another 5xx, never a trace."""
    assert answer.status_code < 500 or answer.status_code == 503, answer.text[:300]
    assert "Traceback" not in answer.text and 'File "/' not in answer.text
    if answer.status_code >= 400 and answer.headers.get("content-type", "").startswith(
        "application/json"
    ):
        assert isinstance(answer.json().get("detail"), str | list)


def mutate(data: bytes, draw_positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for position, value in zip(draw_positions, values, strict=False):
        out[position % len(out)] = value
    return bytes(out)


contents = st.one_of(
    st.binary(max_size=2048),
    st.tuples(
        st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\0" * 128 + b"DICM"]),
        st.binary(max_size=4096),
    ).map(lambda t: t[0] + t[1]),
)


@st.composite
def uploads(draw, seeds):
    kind = draw(st.sampled_from(["seed-mutated", "seed-cut", "random"]))
    if kind == "random":
        return draw(contents)
    seed = draw(st.sampled_from(seeds))
    if kind == "seed-cut":
        return seed[: draw(st.integers(0, len(seed)))]
    positions = draw(st.lists(st.integers(0, len(seed) - 1), min_size=1, max_size=40))
    values = draw(st.lists(st.integers(0, 255), min_size=len(positions), max_size=len(positions)))
    return mutate(seed, positions, values)


@pytest.mark.timeout(900)
def test_fuzzed_requests_get_no_5xx_and_kill_no_worker(server, seeds):
    client, process, workers = server
    schema = client.get("/openapi.json").json()
    routes = [(method.upper(), path) for path, spec in schema["paths"].items() for method in spec]
    assert ("POST", "/api/predict") in routes
    sent = {"n": 0}

    @settings(
        max_examples=2500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(
        route=st.sampled_from(
            [
                *routes,
                ("POST", "/api/predict"),
                ("POST", "/"),
                ("PUT", "/api/predict"),
                ("GET", "/nowhere"),
            ]
        ),
        field=st.sampled_from(["file", "file", "file", "image", "", "fi\x00le"]),
        filename=st.text(max_size=40),
        body_kind=st.sampled_from(["multipart", "multipart", "multipart", "raw", "none"]),
        content_type=st.sampled_from(
            [
                "text/plain",
                "application/json",
                "multipart/form-data",
                "multipart/form-data; boundary=zz",
                "image/png",
                "",
            ]
        ),
        data=uploads(seeds),
    )
    def one(route, field, filename, body_kind, content_type, data):
        method, path = route
        if body_kind == "multipart" and method == "POST":
            answer = client.request(method, path, files={field: (filename, data)})
        elif body_kind == "raw":
            answer = client.request(
                method, path, content=data, headers={"Content-Type": content_type}
            )
        else:
            answer = client.request(method, path)
        sent["n"] += 1
        check(answer)

    one()
    assert sent["n"] >= 2000
    assert process.poll() is None
    now = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
    assert workers <= now, "a worker died and was replaced"
    assert client.get("/health").json()["model_loaded"] is True


def _png_bomb() -> bytes:
    """5000 x 5000 declared (25 MP, within the limit), IDAT of zeros inflating to 25 MB."""
    return raw_png(5000, 5000, zlib.compress(b"\0" * (5001 * 5000), 9))


def test_hand_made_hostile_requests(server, seeds):
    client, process, workers = server
    jpeg, png, progressive, dicom = seeds
    cases = {
        "empty": (b"", 400),
        "zero-length-png-magic": (b"\x89PNG\r\n\x1a\n", 422),
        "wrong-magic": (b"GIF89a" + jpeg[6:], 415),
        "truncated-jpeg": (jpeg[: len(jpeg) // 3], 422),
        "truncated-png": (png[: len(png) // 3], 422),
        "truncated-dicom": (dicom[:400], 422),
        "png-idat-bomb": (_png_bomb(), None),
        "progressive-flood": (
            progressive[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 500 + progressive[-2:],
            422,
        ),
        "dicom-no-rows": (make_dicom(ramp(), drop=("Rows",)), 422),
        "dicom-no-photometric": (make_dicom(ramp(), drop=("PhotometricInterpretation",)), 422),
        "text": (b"Patient: John Doe\n" * 20, 415),
    }
    for name, (data, expected) in cases.items():
        answer = client.post("/api/predict", files={"file": ("x", data)})
        check(answer)
        if expected is not None:
            assert answer.status_code == expected, (name, answer.status_code, answer.text)
    for field in ("image", "upload", "files"):
        answer = client.post("/api/predict", files={field: ("x.jpeg", jpeg)})
        assert answer.status_code == 400 and "form field 'file'" in answer.json()["detail"]
    for content_type, body in (
        ("application/json", b'{"file": "x"}'),
        ("text/plain", jpeg),
        ("multipart/form-data", jpeg),
        ("multipart/form-data; boundary=nope", jpeg),
    ):
        answer = client.post("/api/predict", content=body, headers={"Content-Type": content_type})
        check(answer)
        assert answer.status_code == 400, (content_type, answer.text)
    assert client.post("/api/predict", files={"file": ("x.jpeg", jpeg)}).status_code == 200
    now = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
    assert workers <= now
