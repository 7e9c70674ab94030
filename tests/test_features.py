"""Features: one fixed-length vector whatever the resolution, channels, format or framing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hm_mlflow import features
from hm_mlflow.synthetic import make_film


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    """A 1,000 px synthetic film, 8-bit grayscale."""
    image = cv2.imdecode(
        np.frombuffer(make_film(seed=11, pneumonia=True), np.uint8), cv2.IMREAD_GRAYSCALE
    )
    scale = 1000 / max(image.shape)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)


def encode(image: np.ndarray, ext: str = ".png", **params) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, params["quality"]] if "quality" in params else []
    return cv2.imencode(ext, image, flags)[1].tobytes()


def resized(image: np.ndarray, long_side: int) -> np.ndarray:
    scale = long_side / max(image.shape)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=interp)


@pytest.fixture(scope="module")
def spread() -> np.ndarray:
    """Per-feature standard deviation over different films: the scale a model standardises to."""
    films = [make_film(seed=100 + s, pneumonia=s % 2 == 1) for s in range(12)]
    return np.stack([features.extract(f) for f in films]).std(axis=0) + 1e-6


def distance(a: np.ndarray, b: np.ndarray, spread: np.ndarray) -> float:
    """Mean absolute difference in units of the between-film spread: about 1 for two
    different films, near 0 for two versions of one film."""
    return float(np.mean(np.abs(a - b) / spread))


def test_vector_has_fixed_length_and_is_finite(film):
    vector = features.extract(encode(film))
    assert vector.shape == (features.n_features(),)
    assert vector.dtype == np.float32
    assert np.isfinite(vector).all()


def test_different_films_are_far_apart(spread):
    """The yardstick of the invariance tests below."""
    a, b = (features.extract(make_film(seed=s, pneumonia=False)) for s in (1, 2))
    assert distance(a, b, spread) > 0.5


@pytest.mark.parametrize(
    ("long_side", "bound"),
    # At 3,000 px the JPEG is decoded at 1/8 scale (1/2 for the 1,000 px reference). Feature
    # version 4's grey-level ranks make the texture and HOG groups follow that difference more
    # than version 3's percentile stretch did: 0.168 against 0.106 here. A known cost of the
    # ranks, which the transfer estimate pays back (README, "Measured on the real X-rays").
    [(500, 0.15), (2000, 0.15), (3000, 0.2)],
)
def test_resolution_does_not_change_the_features(film, spread, long_side, bound):
    reference = features.extract(encode(film, ".jpeg", quality=95))
    other = features.extract(encode(resized(film, long_side), ".jpeg", quality=95))
    assert distance(reference, other, spread) < bound


def test_gray_and_rgb_give_the_same_features(film):
    gray = features.extract(encode(film))
    rgb = features.extract(encode(cv2.cvtColor(film, cv2.COLOR_GRAY2BGR)))
    np.testing.assert_allclose(gray, rgb, atol=1e-4)


def test_png_jpeg_and_16_bit_agree(film, spread):
    png = features.extract(encode(film))
    jpeg = features.extract(encode(film, ".jpeg", quality=90))
    deep = features.extract(encode(film.astype(np.uint16) * 257))
    assert distance(png, jpeg, spread) < 0.15
    assert distance(png, deep, spread) < 0.01


def test_black_padding_is_cropped_away(film, spread):
    padded = cv2.copyMakeBorder(film, 120, 120, 200, 200, cv2.BORDER_CONSTANT, value=0)
    assert distance(features.extract(encode(film)), features.extract(encode(padded)), spread) < 0.05


def test_canvas_keeps_the_aspect_ratio():
    """A disc stays a disc: the image is cropped, never stretched."""
    wide = np.zeros((400, 800), np.uint8)
    cv2.circle(wide, (400, 200), 150, 255, -1)
    canvas = features.to_canvas(wide)
    assert canvas.shape == (features.CANVAS, features.CANVAS)
    ys, xs = np.nonzero(canvas > 127)
    assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 2


def test_decode_uses_a_reduced_scale_for_large_jpegs(film):
    big = encode(resized(film, 3000), ".jpeg", quality=90)
    image = features.load(big)
    assert features.CANVAS <= min(image.shape) < 2 * features.CANVAS


def test_classes_differ_in_features():
    """Features carry the signal: a PNEUMONIA film moves away from NORMAL films."""
    normal = np.stack([features.extract(make_film(seed=s, pneumonia=False)) for s in range(6)])
    pneumonia = np.stack([features.extract(make_film(seed=s, pneumonia=True)) for s in range(6)])
    spread = np.concatenate([normal, pneumonia]).std(axis=0) + 1e-6
    gap = np.abs(normal.mean(axis=0) - pneumonia.mean(axis=0)) / spread
    assert gap.max() > 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"\xff\xd8\xff" + b"\x00" * 40,
    ],
)
def test_unreadable_bytes_raise_a_decode_error(data):
    with pytest.raises(features.ImageDecodeError):
        features.extract(data)
