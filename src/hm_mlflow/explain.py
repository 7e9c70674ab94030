"""Where the model looked: occlusion sensitivity on the model's own canvas.

A square patch of the canvas the features are computed from is hidden (set to the canvas'
median grey), the probability is computed again, and the drop is recorded for that patch; the
patch slides over the canvas with a stride smaller than its side. Everything runs through the
served model's own feature code and estimator, so the map explains that version and no other.

It answers "which regions move this model's number", not "where the disease is": a model that
leans on a marker, the framing or the collimation shows it here, which is the point.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PATCH = 32
STRIDE = 16
CAPTION = (
    "How much hiding each region changes this model's probability of pneumonia: red regions "
    "push it up, blue ones down. It shows what this model version responds to, not where "
    "disease is."
)
_RED, _BLUE = np.array([40, 40, 215], np.float32), np.array([215, 110, 30], np.float32)  # BGR
_FAINT = 0.05
"""Changes of probability below this never get full colour: a map of tiny changes stays faint."""


class NotExplainable(Exception):
    """The model does not expose the pieces an occlusion map needs (an older model format)."""


@dataclass(frozen=True)
class Explanation:
    """The occlusion map of one film."""

    probability: float  # P(PNEUMONIA) of the film as it is
    values: np.ndarray  # (rows, cols): probability minus the probability with that patch hidden
    canvas: np.ndarray  # the model's canvas (uint8, square)
    patch: int
    stride: int

    def pixel_map(self) -> np.ndarray:
        """Per canvas pixel, the mean change over the patches that cover it (float32)."""
        side = self.canvas.shape[0]
        total = np.zeros((side, side), np.float32)
        count = np.zeros((side, side), np.float32)
        for (i, j), value in np.ndenumerate(self.values):
            top, left = i * self.stride, j * self.stride
            total[top : top + self.patch, left : left + self.patch] += value
            count[top : top + self.patch, left : left + self.patch] += 1
        return total / np.maximum(count, 1)

    def overlay(self) -> np.ndarray:
        """The canvas in grey with the map over it: red where hiding lowers the probability
        (the region pushes towards PNEUMONIA), blue where it raises it; opacity follows the size
        of the change (BGR uint8)."""
        change = self.pixel_map()
        scale = max(float(np.abs(change).max()), _FAINT)
        alpha = (np.clip(np.abs(change) / scale, 0, 1) * 0.65)[..., np.newaxis]
        colour = np.where((change >= 0)[..., np.newaxis], _RED, _BLUE)
        grey = cv2.cvtColor(self.canvas, cv2.COLOR_GRAY2BGR).astype(np.float32)
        return (grey * (1 - alpha) + colour * alpha).round().astype(np.uint8)

    def overlay_png(self) -> bytes:
        return cv2.imencode(".png", self.overlay(), [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes()

    def as_dict(self, decimals: int = 4) -> dict:
        """The numbers, for the JSON API."""
        return {
            "patch": self.patch,
            "stride": self.stride,
            "canvas": int(self.canvas.shape[0]),
            "rows": int(self.values.shape[0]),
            "cols": int(self.values.shape[1]),
            "values": np.round(self.values, decimals).tolist(),
        }


def occlusion(model, image: bytes, patch: int = PATCH, stride: int = STRIDE) -> Explanation:
    """Occlusion map of `image` (JPEG or PNG bytes) under `model`, the python model of a served
    version: its `features` module (load, to_canvas, from_image) and its `probability`.

    The canvas is what the model computes its features from; `to_canvas` of a canvas is the
    canvas itself, so the film as it is gets exactly the probability the model answers.
    Raises the feature code's ValueError on an image it cannot read.
    """
    features = getattr(model, "features", None)
    if not all(hasattr(features, name) for name in ("load", "to_canvas", "from_image")) or not (
        hasattr(model, "probability")
    ):
        raise NotExplainable("this model version does not expose its canvas and feature code")
    canvas = features.to_canvas(features.load(image))
    side = canvas.shape[0]
    if patch > side or stride < 1:
        raise ValueError(f"patch {patch} and stride {stride} do not fit a {side} px canvas")
    starts = range(0, side - patch + 1, stride)
    fill = np.median(canvas)
    trunk = getattr(model, "trunk", None)  # a learned trunk (feature version 5 on) sees it too

    def describe(film: np.ndarray) -> np.ndarray:
        return features.from_image(film) if trunk is None else features.from_image(film, trunk)

    vectors = [describe(canvas)]
    for top in starts:
        for left in starts:
            hidden = canvas.copy()
            hidden[top : top + patch, left : left + patch] = fill
            vectors.append(describe(hidden))
    # The film as it is, alone: the same computation as the model's answer to /api/predict
    # (a batch may sum in another order and differ in the last bits).
    base = float(np.asarray(model.probability(vectors[0][np.newaxis]))[0])
    hidden_probability = np.asarray(model.probability(np.stack(vectors[1:])), dtype=np.float64)
    values = (base - hidden_probability).reshape(len(starts), len(starts))
    return Explanation(base, values, canvas, patch, stride)
