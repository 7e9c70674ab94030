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
import threading

import cv2
import numpy as np
from PIL import Image

FEATURE_VERSION = "5"
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


def image_size(data: bytes) -> tuple[int, int]:
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


def _line_std(image: np.ndarray, axis: int, squares: np.ndarray | None = None) -> np.ndarray:
    """Standard deviation of each row (axis 1) or column (axis 0) of an 8-bit image, from
    OpenCV's row or column sums of the values and of their squares (exact in float64)."""
    dim = 1 if axis == 1 else 0
    if squares is None:
        squares = cv2.multiply(image, image, dtype=cv2.CV_32F)
    mean = cv2.reduce(image, dim, cv2.REDUCE_AVG, dtype=cv2.CV_64F).ravel()
    square = cv2.reduce(squares, dim, cv2.REDUCE_AVG, dtype=cv2.CV_64F).ravel()
    return np.sqrt(np.maximum(square - mean * mean, 0.0))


def crop_to_content(image: np.ndarray, flat: float = 4.0) -> np.ndarray:
    """Drop uniform borders (padding, collimator edges): rows and columns at the edges whose
    intensity hardly varies."""
    squares = cv2.multiply(image, image, dtype=cv2.CV_32F)  # 255 squared: exact in float32
    rows = np.flatnonzero(_line_std(image, 1, squares) > flat)
    cols = np.flatnonzero(_line_std(image, 0, squares) > flat)
    if len(rows) < image.shape[0] // 4 or len(cols) < image.shape[1] // 4:
        return image
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def load(data: bytes, min_side: int = CANVAS) -> np.ndarray:
    """Decode and crop to content, at the coarsest scale that leaves the content's short side
    at least `min_side` pixels; a padded image is decoded again finer if cropping left too few."""
    width, height = image_size(data)
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
    """Each pixel's rank among the canvas' pixels, 0 to 1 (float32): histogram equalisation,
    with ties at their mid-rank.

    Films from another hospital differ first in their grey-scale processing (exposure, the
    detector's response curve, the LUT the console applies). Any monotonic change of the grey
    levels leaves the ranks, hence the normalised canvas, as they were; the 1st-99th percentile
    stretch used before followed a gamma or a log curve into every feature (bench/quality.py,
    transfer panel: specificity under a log curve 0.61 with the stretch, 0.91 with the ranks).
    The canvas is 8-bit, so the map is a table of the 256 values.
    """
    counts = cv2.calcHist([image], [0], None, [256], [0, 256]).ravel()
    cumulative = np.cumsum(counts)
    table = (cumulative - counts / 2) / cumulative[-1]
    return cv2.LUT(image, table.astype(np.float32))


# --- descriptors --------------------------------------------------------------------------

_GRID = 4
_PERCENTILES = (5, 25, 50, 75, 95)
_LEVELS = 3
"""Gradient scales: pyramid levels of 256, 128 and 64 pixels (scales 1, 2 and 4)."""
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


def _percentiles(values: np.ndarray, qs) -> list[float]:
    """Linearly interpolated percentiles (numpy's default definition) from one sort: numpy's
    own selection is several times slower on arrays of this size."""
    ordered = np.sort(values, axis=None).astype(np.float64)
    last = len(ordered) - 1
    out = []
    for q in qs:
        position = q / 100 * last
        low = int(position)
        high = min(low + 1, last)
        out.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return out


def _band_stats(values: np.ndarray, qs) -> list[float]:
    band = _region(values)
    mean, std = cv2.meanStdDev(band)
    return [float(mean[0, 0]), float(std[0, 0]), *_percentiles(band, qs)]


def intensity_features(canvas: np.ndarray) -> np.ndarray:
    """Brightness of the lung band (opacities raise it) and its layout on a coarse grid."""
    return np.concatenate([_band_stats(canvas, _PERCENTILES), _grid_means(canvas)])


def _pyramid(image: np.ndarray) -> list[np.ndarray]:
    """The image at 1, 1/2 and 1/4 scale (Gaussian pyramid)."""
    levels = [image]
    for _ in range(_LEVELS - 1):
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Edge strength after a one-pixel Gaussian blur. On a pyramid level it is per pixel of
    that level, that is scale-normalised: what blurring the whole canvas by 2 or 4 pixels and
    multiplying by 2 or 4 measures, at a fraction of the cost."""
    smooth = cv2.GaussianBlur(image, (0, 0), 1.0)
    return cv2.magnitude(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))


def gradient_features(canvas: np.ndarray) -> np.ndarray:
    """Gradient magnitude at three scales: edges of ribs and vessels, blurred by opacities."""
    out = []
    for level in _pyramid(canvas):
        magnitude = gradient_magnitude(level)
        out += _band_stats(magnitude, (10, 50, 90))
        out += list(_grid_means(magnitude))
    return np.asarray(out)


_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _lbp_codes(gray: np.ndarray, radius: int) -> np.ndarray:
    """8-neighbour local binary pattern at `radius` of an 8-bit image, mapped to the 10
    rotation-invariant uniform classes (OpenCV's vectorised compares and a lookup table)."""
    height, width = gray.shape
    center = gray[radius : height - radius, radius : width - radius]
    code = np.zeros(center.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_NEIGHBOURS):
        neighbour = gray[
            radius + dy * radius : height - radius + dy * radius,
            radius + dx * radius : width - radius + dx * radius,
        ]
        cv2.bitwise_or(code, cv2.compare(neighbour, center, cv2.CMP_GE) & (1 << bit), dst=code)
    return cv2.LUT(code, _LBP_CLASSES)


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
    the fine texture of vessels and interstitium. Codes are computed for the band only (with
    the margin their neighbours need): the same codes as over the whole canvas, fewer pixels."""
    gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(_to_uint8(canvas))
    out = []
    for radius in _LBP_RADII:
        height, width = gray.shape[0] - 2 * radius, gray.shape[1] - 2 * radius
        top, bottom, left, right = _REGION
        rows = slice(int(height * top), int(height * bottom) + 2 * radius)
        cols = slice(int(width * left), int(width * right) + 2 * radius)
        codes = _lbp_codes(gray[rows, cols], radius)
        counts = cv2.calcHist([codes], [0], None, [10], [0, 10]).ravel()
        out.append(counts / codes.size)
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
    small = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    gx, gy = cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1)
    grid = cv2.resize(
        _grid_means(canvas).reshape(_GRID, _GRID),
        canvas.shape[::-1],
        interpolation=cv2.INTER_NEAREST,
    )
    return {
        "intensity": grid,  # mean brightness of the 4 x 4 grid (and the lung band's statistics)
        "gradient": gradient_magnitude(canvas),  # edge strength at the finest scale
        "texture": _lbp_codes(clahe, 1).astype(np.float32),  # LBP class per pixel
        "hog": np.degrees(np.arctan2(gy, gx)) % 180 * (cv2.magnitude(gx, gy) > 20),  # directions
    }


# --- the learned representation ----------------------------------------------------------

TRUNK_SIDE = 96
"""Side of the trunk's input: the normalised canvas, resampled."""


def trunk_input(canvas: np.ndarray) -> np.ndarray:
    """What the trunk sees of a normalised canvas: TRUNK_SIDE pixels a side, centred on 0."""
    small = cv2.resize(canvas, (TRUNK_SIDE, TRUNK_SIDE), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) - 0.5


class Trunk:
    """A convolutional network trained on the training films (hm_mlflow.trunk), as an ONNX
    graph run by OpenCV's DNN module: trunk inputs (n, TRUNK_SIDE, TRUNK_SIDE) in, one
    embedding per film out. A DNN net is not safe to share between threads: each thread
    reads its own from the same bytes."""

    def __init__(self, onnx: bytes) -> None:
        self.onnx = onnx
        self._local = threading.local()
        self.width = int(self.embed(np.zeros((1, TRUNK_SIDE, TRUNK_SIDE), np.float32)).shape[1])

    def _net(self):
        net = getattr(self._local, "net", None)
        if net is None:
            net = self._local.net = cv2.dnn.readNetFromONNX(np.frombuffer(self.onnx, np.uint8))
        return net

    def embed(self, inputs: np.ndarray) -> np.ndarray:
        """Embeddings (n, width) of trunk inputs (n, TRUNK_SIDE, TRUNK_SIDE)."""
        net = self._net()
        net.setInput(np.ascontiguousarray(inputs[:, np.newaxis], dtype=np.float32))
        return net.forward().reshape(len(inputs), -1).astype(np.float32)


def describe(canvas: np.ndarray, trunk: Trunk | None = None) -> np.ndarray:
    """Feature vector of a preprocessed canvas: the descriptors, then the trunk's embedding
    when the model has a trunk."""
    parts = [d(canvas) for d in DESCRIPTORS.values()]
    if trunk is not None:
        parts.append(trunk.embed(trunk_input(canvas)[np.newaxis])[0])
    return np.concatenate(parts).astype(np.float32)


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


def from_image(image: np.ndarray, trunk: Trunk | None = None) -> np.ndarray:
    """Feature vector of a decoded, cropped 8-bit grayscale image (see `load`)."""
    return describe(normalise(to_canvas(image)), trunk)


def extract(data: bytes, trunk: Trunk | None = None) -> np.ndarray:
    """Image bytes -> feature vector (float32, fixed length `n_features(trunk)`)."""
    return from_image(load(data), trunk)


def n_features(trunk: Trunk | None = None) -> int:
    return len(describe(np.zeros((CANVAS, CANVAS), np.float32))) + (trunk.width if trunk else 0)
