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

FEATURE_VERSION = "2"
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


# --- descriptors --------------------------------------------------------------------------

_GRID = 4
_PERCENTILES = (5, 25, 50, 75, 95)
_SCALES = (1.0, 2.0, 4.0)
_LBP_RADII = (1, 2, 4)
_REGION = (1 / 8, 7 / 8, 1 / 10, 9 / 10)
"""Rows and columns (fractions) of the band where the lung fields lie on a frontal film."""


def _region(values: np.ndarray) -> np.ndarray:
    height, width = values.shape[:2]
    top, bottom, left, right = _REGION
    return values[int(height * top) : int(height * bottom), int(width * left) : int(width * right)]


def _grid_means(values: np.ndarray, grid: int = _GRID) -> np.ndarray:
    """Mean of `values` over a `grid` x `grid` tiling (area interpolation does exactly this)."""
    return cv2.resize(values, (grid, grid), interpolation=cv2.INTER_AREA).ravel()


def intensity_features(canvas: np.ndarray) -> np.ndarray:
    """Brightness of the lung band (opacities raise it) and its layout on a coarse grid."""
    band = _region(canvas)
    stats = [band.mean(), band.std(), *np.percentile(band, _PERCENTILES)]
    return np.concatenate([stats, _grid_means(canvas)])


def gradient_features(canvas: np.ndarray) -> np.ndarray:
    """Gradient magnitude at several scales: edges of ribs and vessels, blurred by opacities."""
    out = []
    for sigma in _SCALES:
        smooth = cv2.GaussianBlur(canvas, (0, 0), sigma)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
        magnitude = cv2.magnitude(gx, gy) * sigma  # scale-normalised
        band = _region(magnitude)
        out += [band.mean(), band.std(), *np.percentile(band, (10, 50, 90))]
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
    """Local binary pattern histograms of the lung band at radii 1, 2 and 4, on CLAHE contrast:
    the fine texture of vessels and interstitium."""
    gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(_to_uint8(canvas))
    out = []
    for radius in _LBP_RADII:
        codes = _region(_lbp_codes(gray, radius))
        out.append(np.bincount(codes.ravel(), minlength=10) / codes.size)
    return np.concatenate(out)


def hog_features(canvas: np.ndarray) -> np.ndarray:
    """Histogram of oriented gradients, 16 px cells on a 128 px version: the shape of the
    anatomy (ribs, borders of heart and diaphragm, which opacities blur)."""
    small = cv2.resize(_to_uint8(canvas), (128, 128), interpolation=cv2.INTER_AREA)
    return _hog().compute(small).ravel()


def _hog() -> cv2.HOGDescriptor:
    # window 128, blocks of 2 x 2 cells of 16 px, stride one cell, 9 orientations: 1,764 values
    return cv2.HOGDescriptor((128, 128), (32, 32), (16, 16), (16, 16), 9)


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return (canvas * 255).astype(np.uint8)


DESCRIPTORS = {
    "intensity": intensity_features,
    "gradient": gradient_features,
    "texture": texture_features,
    "hog": hog_features,
}
"""The feature vector is these groups, concatenated in this order."""


def descriptor_maps(canvas: np.ndarray) -> dict[str, np.ndarray]:
    """The images each descriptor group summarises, for showing what it responds to (the
    training notebook); `describe` computes the statistics of these same maps."""
    gray = _to_uint8(canvas)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    smooth = cv2.GaussianBlur(canvas, (0, 0), _SCALES[1])
    gradient = cv2.magnitude(
        cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    )
    small = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    gx, gy = cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1)
    grid = cv2.resize(
        _grid_means(canvas).reshape(_GRID, _GRID),
        canvas.shape[::-1],
        interpolation=cv2.INTER_NEAREST,
    )
    return {
        "intensity": grid,  # mean brightness of the 4 x 4 grid (and the lung band's statistics)
        "gradient": gradient * _SCALES[1],  # edge strength at the middle scale
        "texture": _lbp_codes(clahe, _LBP_RADII[0]).astype(np.float32),  # LBP class per pixel
        "hog": np.degrees(np.arctan2(gy, gx)) % 180 * (cv2.magnitude(gx, gy) > 20),  # directions
    }


def describe(canvas: np.ndarray) -> np.ndarray:
    """Feature vector of a preprocessed canvas."""
    return np.concatenate([d(canvas) for d in DESCRIPTORS.values()]).astype(np.float32)


def group_columns(*names: str) -> np.ndarray:
    """Column indices of the named descriptor groups in the feature vector."""
    blank = np.zeros((CANVAS, CANVAS), np.float32)
    columns, start = [], 0
    for name, descriptor in DESCRIPTORS.items():
        width = len(descriptor(blank))
        if name in names:
            columns += range(start, start + width)
        start += width
    return np.array(columns, dtype=np.int64)


def from_image(image: np.ndarray) -> np.ndarray:
    """Feature vector of a decoded, cropped 8-bit grayscale image (see `load`)."""
    return describe(normalise(to_canvas(image)))


def extract(data: bytes) -> np.ndarray:
    """Image bytes -> feature vector (float32, fixed length `n_features()`)."""
    return from_image(load(data))


def n_features() -> int:
    return len(describe(np.zeros((CANVAS, CANVAS), np.float32)))
