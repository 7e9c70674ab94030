"""Training-time augmentation: other framings and exposures of the same film.

In the Kaggle training set the classes differ in framing: PNEUMONIA films are collimated tighter
(less neck and abdomen) than NORMAL ones. A model learns that shortcut and then calls a tightly
framed NORMAL film PNEUMONIA, which is how models of this data set lose their specificity on new
films. Each training image therefore gets copies cropped anywhere in the film to 45-100 % of its
area, slightly rotated, with another exposure (gain, offset, gamma), blur and noise. The copies
carry their original's label and patient, so cross-validation keeps them on the same side.

Used by training only: a model never augments what it is asked to classify.
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_AREA = (0.45, 1.0)
CROP_ASPECT = (0.8, 1.25)
ROTATION_DEGREES = 6.0
GAMMA = (0.7, 1.4)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly reframed and re-exposed copy of an 8-bit grayscale film."""
    height, width = image.shape
    scale = rng.uniform(*CROP_AREA) ** 0.5
    aspect = rng.uniform(*CROP_ASPECT)
    crop_h = min(height, int(height * scale * aspect**0.5))
    crop_w = min(width, int(width * scale / aspect**0.5))
    top = rng.integers(0, height - crop_h + 1)
    left = rng.integers(0, width - crop_w + 1)
    crop = image[top : top + crop_h, left : left + crop_w]

    rotation = cv2.getRotationMatrix2D(
        (crop_w / 2, crop_h / 2), rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES), 1.0
    )
    crop = cv2.warpAffine(crop, rotation, (crop_w, crop_h), borderMode=cv2.BORDER_REFLECT)

    film = crop.astype(np.float32) / 255
    film = np.clip(film * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1)
    film = film ** rng.uniform(*GAMMA)
    film = cv2.GaussianBlur(film, (0, 0), rng.uniform(0.01, 1.5))
    film = film + rng.normal(0, rng.uniform(0, 0.02), film.shape).astype(np.float32)
    return (np.clip(film, 0, 1) * 255).astype(np.uint8)
