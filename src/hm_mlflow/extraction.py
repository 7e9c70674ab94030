"""Features of many films at once, for training: every film as serving sees it
(`features.extract`'s path), its augmented copies, the transfer panel's shifts and the
framing-matched view, and the learned trunk's inputs, over worker processes.

Kept apart from `hm_mlflow.train` so that a worker process imports only what it runs (OpenCV,
NumPy and the feature code), not MLflow, scikit-learn's serialisation or PyTorch: a worker
starts in about a second instead of fifteen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from hm_mlflow import features
from hm_mlflow.augment import augment
from hm_mlflow.dataset import Sample
from hm_mlflow.shifts import PANEL, reframe

_BATCH = 32
"""Films per task handed to a worker."""


@dataclass
class Extracted:
    """Features of a list of images, in order; an unreadable image has rows of NaN."""

    X: np.ndarray  # (n, d) what serving computes
    X_aug: np.ndarray  # (copies, n, d) augmented copies, for training
    X_shifted: np.ndarray  # (shifts, n, d) the transfer panel, for the estimate only
    digests: list[str]  # SHA-256 of each image's bytes, "" if unreadable
    # (1 + copies + shifts, n, side, side) float16: the trunk's inputs of the film as served,
    # of its copies and under the panel, in that order; None when no trunk is trained
    views: np.ndarray | None = None


def _describe(canvas: np.ndarray, views: np.ndarray | None, view: int, offset: int):
    """The descriptors of a canvas, keeping its trunk input as view `view` of film `offset`."""
    if views is not None:
        views[view, offset] = features.trunk_input(canvas)
    return features.describe(canvas)


def _extract_batch(
    samples: list[Sample],
    first: int,
    copies: int,
    seed: int,
    frame_to: np.ndarray | None,
    trunk: bool = False,
):
    """Features of a batch (see `Extracted`). With `frame_to` (one aspect ratio or NaN per
    film), the panel's shifts and, after them, each film reframed to its aspect ratio."""
    cv2.setNumThreads(1)  # one process per core already
    width = features.n_features()
    panel = [] if frame_to is None else [*PANEL.values(), None]  # None: the framing-matched view
    side = features.TRUNK_SIDE
    out = Extracted(
        np.full((len(samples), width), np.nan, dtype=np.float32),
        np.full((copies, len(samples), width), np.nan, dtype=np.float32),
        np.full((len(panel), len(samples), width), np.nan, dtype=np.float32),
        [""] * len(samples),
        np.zeros((1 + copies + len(panel), len(samples), side, side), np.float16)
        if trunk
        else None,
    )
    for offset, sample in enumerate(samples):
        data = sample.read_bytes()
        try:
            # exactly what serving computes (features.extract), the canvas kept for the trunk
            canvas = features.normalise(features.to_canvas(features.load(data)))
            out.X[offset] = _describe(canvas, out.views, 0, offset)
            if copies or panel:
                # Cut from a finer decode, so a 65 % crop keeps the canvas' detail.
                film = features.load(data, min_side=2 * features.CANVAS)
            rng = np.random.default_rng([seed, first + offset])
            for k in range(copies):
                canvas = features.normalise(features.to_canvas(augment(film, rng)))
                out.X_aug[k, offset] = _describe(canvas, out.views, 1 + k, offset)
            for k, shift in enumerate(panel):
                if shift is None:  # reframed as drawn (shifts.framing_targets), or as it is
                    aspect = frame_to[offset]
                    shifted = film if np.isnan(aspect) else reframe(film, aspect)
                else:
                    shifted = shift(film)
                shifted = features.crop_to_content(shifted)  # as an upload would be
                canvas = features.normalise(features.to_canvas(shifted))
                out.X_shifted[k, offset] = _describe(canvas, out.views, 1 + copies + k, offset)
        except (ValueError, cv2.error):
            out.X[offset] = np.nan
            continue
        out.digests[offset] = hashlib.sha256(data).hexdigest()
    return out


def extract_features(
    samples: list[Sample],
    n_jobs: int,
    copies: int = 0,
    seed: int = 0,
    progress: bool = True,
    frame_to: np.ndarray | None = None,
    trunk: bool = False,
) -> Extracted:
    """Features of `samples`, of `copies` augmented copies of each and (with `frame_to`) of
    each under the transfer panel and reframed (`_extract_batch`), with their content hashes,
    over `n_jobs` processes; with `trunk`, the trunk's inputs of all of them. Deterministic for
    a given `seed`."""
    starts = range(0, len(samples), _BATCH)
    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_extract_batch)(
            samples[i : i + _BATCH],
            i,
            copies,
            seed,
            None if frame_to is None else frame_to[i : i + _BATCH],
            trunk,
        )
        for i in starts
    )
    batches = []
    with tqdm(total=len(samples), desc="features", unit="img", disable=not progress) as bar:
        for batch in results:
            batches.append(batch)
            bar.update(len(batch.digests))
    return Extracted(
        np.concatenate([b.X for b in batches]),
        np.concatenate([b.X_aug for b in batches], axis=1),
        np.concatenate([b.X_shifted for b in batches], axis=1),
        [d for b in batches for d in b.digests],
        np.concatenate([b.views for b in batches], axis=1) if trunk else None,
    )
