"""Training-time augmentation: other framings, exposures and processing of the same film.

In the Kaggle training set the classes differ in framing: PNEUMONIA films are collimated tighter
(less neck and abdomen) than NORMAL ones. A model learns that shortcut and then calls a tightly
framed NORMAL film PNEUMONIA, which is how models of this data set lose their specificity on new
films. Each training image therefore gets copies cut anywhere in the film to 65-100 % of its
height and 80-100 % of its width (a NORMAL film framed like a PNEUMONIA one), slightly rotated,
with another exposure curve, and with the processing another console applies: none, edge
enhancement (unsharp masking) or local contrast equalisation (CLAHE), then blur and noise. The
copies carry their original's label and patient, so cross-validation keeps them on the same side.

The transfer estimate (`hm_mlflow.shifts`) judges the model on shifts of fixed, harder strength
that this module does not draw, so it measures more than the augmentation taught.

Used by training only: a model never augments what it is asked to classify.
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_HEIGHT = (0.65, 1.0)
CROP_WIDTH = (0.8, 1.0)
ROTATION_DEGREES = 6.0
GAMMA = (0.6, 1.6)
PROCESSING = ("none", "unsharp", "clahe")


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly reframed, re-exposed and re-processed copy of an 8-bit grayscale film."""
    height, width = image.shape
    crop_h = int(height * rng.uniform(*CROP_HEIGHT))
    crop_w = int(width * rng.uniform(*CROP_WIDTH))
    top = rng.integers(0, height - crop_h + 1)
    left = rng.integers(0, width - crop_w + 1)
    crop = image[top : top + crop_h, left : left + crop_w]
    rotation = cv2.getRotationMatrix2D(
        (crop_w / 2, crop_h / 2), rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES), 1.0
    )
    crop = cv2.warpAffine(crop, rotation, (crop_w, crop_h), borderMode=cv2.BORDER_REFLECT)

    film = (crop.astype(np.float32) / 255) ** rng.uniform(*GAMMA)
    processing = PROCESSING[rng.integers(0, len(PROCESSING))]
    if processing == "unsharp":
        sigma = rng.uniform(1, 4) * max(crop_h, crop_w) / 1000
        film = film + rng.uniform(0.3, 1.0) * (film - cv2.GaussianBlur(film, (0, 0), sigma))
    elif processing == "clahe":
        clahe = cv2.createCLAHE(clipLimit=rng.uniform(1.0, 3.0), tileGridSize=(8, 8))
        film = clahe.apply((np.clip(film, 0, 1) * 255).astype(np.uint8)).astype(np.float32) / 255
    film = cv2.GaussianBlur(film, (0, 0), rng.uniform(0.01, 1.5))
    film = film + rng.normal(0, rng.uniform(0, 0.02), film.shape).astype(np.float32)
    return (np.clip(film, 0, 1) * 255).astype(np.uint8)
