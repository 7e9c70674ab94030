"""The transfer panel: acquisition shifts a film from another hospital may carry.

Grouped cross-validation scores held-out patients of the same two collections, acquired,
processed and framed like the training films; it said 0.97 specificity for a model that gave
0.71 on the next batch of films. The panel below re-scores the same held-out films (each by the
fold model that never saw it) after one fixed, named change each: exposure curves, console
processing, detector artefacts and framing. Pooled, they give the transfer estimate logged as
`transfer_*`; per shift, they show which change a model cannot take (`transfer/shifts.json`).

The strengths are fixed and harder than the training augmentation (`hm_mlflow.augment`), and
three kinds (equalisation, grid lines, text markers) are never drawn in training: the estimate
measures more than what the augmentation taught. Each shift works on the film as training
decodes it for augmentation (short side 512 pixels) and is followed by the serving pipeline's
own crop to content, so a padded film is cropped as an upload would be.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Shift = Callable[[np.ndarray], np.ndarray]


def _lut(image: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Apply a grey-level curve given on 0..1 to an 8-bit image."""
    table = np.clip(np.rint(curve * 255), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


_LEVELS = np.arange(256) / 255.0


def gamma(value: float) -> Shift:
    return lambda image: _lut(image, _LEVELS**value)


def log_curve(image: np.ndarray) -> np.ndarray:
    """A logarithmic detector response: dark tones lifted, bright ones compressed."""
    return _lut(image, np.log1p(9 * _LEVELS) / np.log(10))


def clahe(image: np.ndarray) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)


def equalise(image: np.ndarray) -> np.ndarray:
    return cv2.equalizeHist(image)


def unsharp(image: np.ndarray) -> np.ndarray:
    """Strong edge enhancement, as some consoles apply by default."""
    blurred = cv2.GaussianBlur(image, (0, 0), 3 * max(image.shape) / 1000 + 1)
    return cv2.addWeighted(image, 2.0, blurred, -1.0, 0)


def noise(image: np.ndarray) -> np.ndarray:
    """Detector noise: Gaussian, 6 grey levels, the same pattern for every film."""
    pattern = np.random.default_rng(0).normal(0, 6, image.shape)
    return np.clip(image + pattern, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> np.ndarray:
    """An archive that stored the film as a JPEG of quality 25."""
    encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 25])[1]
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def grid_lines(image: np.ndarray) -> np.ndarray:
    """An anti-scatter grid's horizontal lines: a period of 1 % of the height, 10 grey levels."""
    rows = np.arange(image.shape[0])
    stripes = 10 * np.sin(2 * np.pi * rows / max(2.0, image.shape[0] / 100))
    return np.clip(image + stripes[:, None], 0, 255).astype(np.uint8)


def zoom(image: np.ndarray) -> np.ndarray:
    """Tighter collimation all round: the central 80 % of each side."""
    height, width = image.shape
    top, left = height // 10, width // 10
    return image[top : height - top, left : left + width - 2 * left]


def wide(image: np.ndarray) -> np.ndarray:
    """Collimated to the chest: neck and abdomen cut until the film is 1.55 times wider than
    tall (the PNEUMONIA films' framing in the training set)."""
    height, width = image.shape
    keep = min(height, int(width / 1.55))
    top = (height - keep) // 2
    return image[top : top + keep]


def rotate(image: np.ndarray) -> np.ndarray:
    """A patient turned by 8 degrees."""
    height, width = image.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), 8.0, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_CONSTANT)


def markers(image: np.ndarray) -> np.ndarray:
    """A side marker and a burnt-in text label, in white."""
    marked = image.copy()
    height, width = image.shape
    scale = max(height, width) / 1000
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(marked, "L", (int(0.08 * width), int(0.15 * height)), font, 3 * scale, 255, 6)
    cv2.putText(marked, "PORTABLE", (int(0.55 * width), int(0.08 * height)), font, scale, 255, 3)
    return marked


PANEL: dict[str, Shift] = {
    "gamma_0.6": gamma(0.6),
    "gamma_1.6": gamma(1.6),
    "log_curve": log_curve,
    "clahe": clahe,
    "equalise": equalise,
    "unsharp": unsharp,
    "noise": noise,
    "jpeg_25": jpeg,
    "grid_lines": grid_lines,
    "zoom_80": zoom,
    "wide_1.55": wide,
    "rotate_8": rotate,
    "markers": markers,
}
"""Name -> shift, in the order their features are stored (`X_shifted[k]` is shift k)."""


# --- a shift fitted to the data: NORMAL films framed as the PNEUMONIA films are ---------------


def reframe(image: np.ndarray, aspect: float) -> np.ndarray:
    """Neck and abdomen cut until the film is `aspect` times wider than tall (centred); a film
    already that wide is left as it is."""
    height, width = image.shape
    keep = min(height, max(1, int(width / aspect)))
    top = (height - keep) // 2
    return image[top : top + keep]


def framing_targets(aspects: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """For each NORMAL film (y == 0), an aspect ratio drawn from the PNEUMONIA films' own
    (width / height of the films as stored); NaN for a PNEUMONIA film, which stays as it is.

    The one difference between the classes of the Kaggle training set that is not disease is
    framing: NORMAL films have a median aspect of 1.21, PNEUMONIA ones of 1.50 (MANIFEST.csv).
    A model that learnt it calls a NORMAL film framed like a PNEUMONIA one PNEUMONIA; the
    framing-matched estimate (`framed_*`) scores the held-out NORMAL films reframed to the
    PNEUMONIA films' distribution, that is a batch whose only change is the one this training
    set teaches wrongly. The hand-chosen panel has the worst case of it (`wide_1.55`); this is
    its distribution, fitted to the films.
    """
    rng = np.random.default_rng([seed, 1_551])
    pneumonia = aspects[(y == 1) & np.isfinite(aspects)]
    targets = np.full(len(y), np.nan)
    if len(pneumonia):
        normal = np.flatnonzero(y == 0)
        targets[normal] = rng.choice(pneumonia, len(normal))
    return targets
