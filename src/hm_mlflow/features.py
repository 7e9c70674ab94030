"""Image bytes -> feature vector: the one feature function of training and serving.

Pure functions of the bytes, no I/O. Every logged model carries a copy of this file and runs
that copy when it predicts (`hm_mlflow.model_code`), so a model keeps the exact preprocessing it
was trained with. That is also why it imports nothing but NumPy, OpenCV and Pillow: the copy is
loaded on its own, outside the package.

Nothing here may depend on the input's resolution, aspect ratio, channels or format: images are
decoded to grayscale, cropped to their content, resampled isotropically to a fixed canvas, and
described by statistics that do not count pixels.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

FEATURE_VERSION = "1"
CANVAS = 256
"""Side of the square canvas every image is resampled to before description."""

_REDUCED = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class ImageDecodeError(ValueError):
    """The bytes are not an image that can be read."""


def _size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone (Pillow reads no pixels for this)."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except Exception as exc:
        raise ImageDecodeError(f"not a readable image: {exc}") from exc


def decode(data: bytes, factor: int = 1) -> np.ndarray:
    """Decode to 8-bit grayscale at 1/`factor` scale (1, 2, 4 or 8).

    JPEG decodes at reduced scale inside libjpeg, far cheaper than a full decode and a resize;
    other formats decode in full and are resized by OpenCV.
    """
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor])
    if image is None or image.size == 0:
        raise ImageDecodeError("the image data is corrupt or in an unsupported encoding")
    return image


def crop_to_content(image: np.ndarray, flat: float = 4.0) -> np.ndarray:
    """Drop uniform borders (padding, collimator edges): rows and columns at the edges whose
    intensity hardly varies."""
    rows = np.flatnonzero(image.std(axis=1) > flat)
    cols = np.flatnonzero(image.std(axis=0) > flat)
    if len(rows) < image.shape[0] // 4 or len(cols) < image.shape[1] // 4:
        return image
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def load(data: bytes, min_side: int = CANVAS) -> np.ndarray:
    """Decode and crop to content, at the coarsest scale that leaves the content's short side
    at least `min_side` pixels; a padded image is decoded again finer if cropping left too few."""
    width, height = _size(data)
    factor = next((f for f in (8, 4, 2) if min(width, height) // f >= min_side), 1)
    while True:
        image = crop_to_content(decode(data, factor))
        if min(image.shape) >= min_side or factor == 1:
            return image
        factor //= 2


def to_canvas(image: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """Isotropic resample so the short side is `size`, then the central `size` x `size` square.

    Aspect ratio never reaches the features: the image is never stretched.
    """
    height, width = image.shape
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def normalise(image: np.ndarray) -> np.ndarray:
    """Stretch intensities so the 1st and 99th percentiles map to 0 and 1 (float32)."""
    lo, hi = (float(v) for v in np.percentile(image, (1, 99)))
    scaled = (image.astype(np.float32) - lo) / max(hi - lo, 1.0)
    return np.clip(scaled, 0.0, 1.0)


def preprocess(data: bytes) -> np.ndarray:
    """Bytes -> normalised square canvas, float32 in [0, 1]."""
    return normalise(to_canvas(load(data)))


# --- descriptors --------------------------------------------------------------------------

_GRID = 4
_PERCENTILES = (5, 25, 50, 75, 95)
_SCALES = (1.0, 2.0, 4.0)


def _grid_means(values: np.ndarray, grid: int = _GRID) -> np.ndarray:
    """Mean of `values` over a `grid` x `grid` tiling (area interpolation does exactly this)."""
    return cv2.resize(values, (grid, grid), interpolation=cv2.INTER_AREA).ravel()


def _lung_region(canvas: np.ndarray) -> np.ndarray:
    """The central band where the lung fields lie on a frontal chest film."""
    size = canvas.shape[0]
    return canvas[size // 8 : size * 7 // 8, size // 10 : size * 9 // 10]


def intensity_features(canvas: np.ndarray) -> np.ndarray:
    lungs = _lung_region(canvas)
    stats = [lungs.mean(), lungs.std(), *np.percentile(lungs, _PERCENTILES)]
    return np.concatenate([stats, _grid_means(canvas)])


def gradient_features(canvas: np.ndarray) -> np.ndarray:
    """Gradient magnitude at several scales: edges of ribs and vessels, blurred by opacities."""
    out = []
    for sigma in _SCALES:
        smooth = cv2.GaussianBlur(canvas, (0, 0), sigma)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
        magnitude = cv2.magnitude(gx, gy) * sigma  # scale-normalised
        lungs = _lung_region(magnitude)
        out += [lungs.mean(), lungs.std(), *np.percentile(lungs, (50, 90))]
        out += list(_grid_means(magnitude))
    return np.asarray(out)


def _lbp_codes(gray: np.ndarray, radius: int) -> np.ndarray:
    """8-neighbour local binary pattern at `radius`, mapped to the 10 rotation-invariant
    uniform classes."""
    height, width = gray.shape
    center = gray[radius : height - radius, radius : width - radius]
    code = np.zeros(center.shape, np.uint8)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    for bit, (dy, dx) in enumerate(offsets):
        neighbour = gray[
            radius + dy * radius : height - radius + dy * radius,
            radius + dx * radius : width - radius + dx * radius,
        ]
        code |= (neighbour >= center).astype(np.uint8) << bit
    return _LBP_CLASSES[code]


def _lbp_class_table() -> np.ndarray:
    table = np.empty(256, np.uint8)
    for value in range(256):
        bits = [(value >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        table[value] = sum(bits) if transitions <= 2 else 9
    return table


_LBP_CLASSES = _lbp_class_table()


def texture_features(canvas: np.ndarray) -> np.ndarray:
    """Local binary pattern histograms (radius 1, 2, 4) of the lung region, on CLAHE contrast."""
    gray = (canvas * 255).astype(np.uint8)
    gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    lungs = _lung_region(gray)
    out = []
    for radius in (1, 2, 4):
        codes = _lbp_codes(lungs, radius)
        out.append(np.bincount(codes.ravel(), minlength=10) / codes.size)
    return np.concatenate(out)


def hog_features(canvas: np.ndarray) -> np.ndarray:
    """Histogram of oriented gradients on a 128 px version: the shape of the anatomy."""
    small = cv2.resize((canvas * 255).astype(np.uint8), (128, 128), interpolation=cv2.INTER_AREA)
    return _HOG.compute(small).ravel()


_HOG = cv2.HOGDescriptor((128, 128), (32, 32), (32, 32), (16, 16), 9)

_DESCRIPTORS = (intensity_features, gradient_features, texture_features, hog_features)


def describe(canvas: np.ndarray) -> np.ndarray:
    """Feature vector of a preprocessed canvas."""
    return np.concatenate([d(canvas) for d in _DESCRIPTORS]).astype(np.float32)


def extract(data: bytes) -> np.ndarray:
    """Image bytes -> feature vector (float32, fixed length `n_features()`)."""
    return describe(preprocess(data))


def n_features() -> int:
    return len(describe(np.zeros((CANVAS, CANVAS), np.float32)))
