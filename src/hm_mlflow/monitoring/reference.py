"""What a version saw in training, stored with it: the reference drift is measured against.

At training, the films' feature vectors are standardised and reduced by PCA to a compact
summary: the first `COMPONENTS` coordinates plus the norm of what they leave out (so a shift
outside the training films' main directions still shows). The model carries the projection
(`reference.npz` among its artifacts, checksummed like its other files) and computes each
answered film's summary in the same pass as its features; the prediction log stores it. The
reference also holds the training films' own summaries and their out-of-fold probabilities
(what the recipe gives films it has not seen, from the training distribution): input drift
compares summaries, score drift compares probabilities.

`summaries` here and `ChestXrayClassifier.summarise` in `model_code.py` are the same four lines
(the logged model imports nothing from this package); tests/test_monitoring.py checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMPONENTS = 32
FORMAT = 1


@dataclass(frozen=True)
class Reference:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), orthonormal rows
    summaries: np.ndarray  # (n, k + 1) of the training films
    probabilities: np.ndarray  # (n,) out-of-fold P(PNEUMONIA) of the training films
    labels: np.ndarray  # (n,) 0 NORMAL, 1 PNEUMONIA

    @property
    def width(self) -> int:
        return self.components.shape[0] + 1

    def summarise(self, vectors: np.ndarray) -> np.ndarray:
        return summaries(vectors, self.mean, self.scale, self.components)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "format": np.array(FORMAT),
            "mean": self.mean,
            "scale": self.scale,
            "components": self.components,
            "summaries": self.summaries,
            "probabilities": self.probabilities,
            "labels": self.labels,
        }


def summaries(
    vectors: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray
) -> np.ndarray:
    """(n, k + 1): PCA coordinates of the standardised vectors, and the residual's norm."""
    z = (np.atleast_2d(vectors).astype(np.float64) - mean) / scale
    coords = z @ components.T.astype(np.float64)
    residual = np.sqrt(np.maximum((z * z).sum(axis=1) - (coords * coords).sum(axis=1), 0.0))
    return np.column_stack([coords, residual]).astype(np.float32)


def build(X: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, seed: int = 0) -> Reference:
    """The reference of a training set: X the films' feature vectors (as served: no augmented
    copies), `probabilities` their out-of-fold probabilities."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (X - mean) / scale
    k = max(1, min(COMPONENTS, z.shape[0] - 1, z.shape[1]))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(z)
    components = pca.components_
    return Reference(
        mean.astype(np.float32),
        scale.astype(np.float32),
        components.astype(np.float32),
        summaries(
            X, mean.astype(np.float32), scale.astype(np.float32), components.astype(np.float32)
        ),
        np.asarray(probabilities, dtype=np.float32),
        np.asarray(labels, dtype=np.int8),
    )


def save(reference: Reference, path: Path) -> Path:
    np.savez_compressed(path, **reference.arrays())
    return path


def from_arrays(arrays) -> Reference:
    """A reference from its saved arrays (a loaded npz, or the logged model's own copy)."""
    if int(arrays["format"]) != FORMAT:
        raise ValueError(f"reference format {int(arrays['format'])}, expected {FORMAT}")
    return Reference(
        arrays["mean"],
        arrays["scale"],
        arrays["components"],
        arrays["summaries"],
        arrays["probabilities"],
        arrays["labels"],
    )


def load(path: str | Path) -> Reference:
    with np.load(path, allow_pickle=False) as data:
        return from_arrays(data)
