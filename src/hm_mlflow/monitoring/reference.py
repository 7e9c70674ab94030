"""What a version saw in training, stored with it: the reference drift is measured against.

At training, the films' feature vectors are standardised and reduced by PCA to a compact
summary: the first `COMPONENTS` coordinates plus the norm of what they leave out (so a shift
outside the training films' main directions still shows). The model carries the projection
(`reference.npz` among its artifacts, checksummed like its other files) and computes each
answered film's summary in the same pass as its features; the prediction log stores it.

The projection is fitted on half of the data root's training patients, and the reference rows
are the other films: the other half and every readers' film. A film answered in service was not
among those the projection was fitted on, and neither is a reference row; with 1,880 features and
about 1,100 films, films the PCA was fitted on sit measurably closer to its subspace than any
new film (measured on ../shared with unshifted films of new patients: domain AUC 0.675 against
the films it was fitted on, 0.517 against the other half). Each row keeps its site ("" for the
data root), so a site's traffic can be compared with that site's own training films once a
version has learnt from them. The reference also holds the final model's probabilities for the
same films, for score drift: the fold models of cross-validation each saturate at their own
calibrated ceiling, which a KS test alone tells apart (KS 0.35 between them and the final model
on the same kind of films, 0.05 between the final model's training and new films).

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
    summaries: np.ndarray  # (n, k + 1) of the reference films
    probabilities: np.ndarray  # (n,) the final model's P(PNEUMONIA) of the reference films
    labels: np.ndarray  # (n,) 0 NORMAL, 1 PNEUMONIA
    sites: np.ndarray  # (n,) each reference film's site, "" for the data root's

    def rows_for(self, site: str, minimum: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(summaries, probabilities, what they are) to compare a site's traffic with: the
        site's own training films when the version learnt from at least `minimum` of them,
        else the data root's films."""
        own = self.sites == site
        if own.sum() >= minimum:
            return self.summaries[own], self.probabilities[own], f"the {site} films it learnt from"
        root = self.sites == ""
        return self.summaries[root], self.probabilities[root], "its training films"

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
            "sites": self.sites,
        }


def summaries(
    vectors: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray
) -> np.ndarray:
    """(n, k + 1): PCA coordinates of the standardised vectors, and the residual's norm."""
    z = (np.atleast_2d(vectors).astype(np.float64) - mean) / scale
    coords = z @ components.T.astype(np.float64)
    residual = np.sqrt(np.maximum((z * z).sum(axis=1) - (coords * coords).sum(axis=1), 0.0))
    return np.column_stack([coords, residual]).astype(np.float32)


def build(
    X: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    sites: np.ndarray | None = None,
    seed: int = 0,
) -> Reference:
    """The reference of a training set: X the films' feature vectors (as served: no augmented
    copies), `probabilities` the final model's for them, `groups` their patients, `sites` their
    sites ("" or None for the data root's films). The projection is fitted on half of the data
    root's patients; the reference rows are every other film."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    groups = np.asarray(groups)
    sites = np.array(
        ["" if s is None else s for s in sites] if sites is not None else [""] * len(X)
    )
    root = sites == ""
    patients = np.unique(groups[root])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(patients, len(patients) // 2, replace=False)
    fit = root & np.isin(groups, chosen)
    rows = ~fit
    if fit.sum() < 2 or rows.sum() < 2:  # a tiny set: fit on everything
        fit = rows = np.ones(len(X), dtype=bool)
    mean = X[fit].mean(axis=0)
    scale = X[fit].std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (X[fit] - mean) / scale
    k = max(1, min(COMPONENTS, z.shape[0] - 1, z.shape[1]))
    components = PCA(n_components=k, svd_solver="full", random_state=seed).fit(z).components_
    mean, scale, components = (a.astype(np.float32) for a in (mean, scale, components))
    return Reference(
        mean,
        scale,
        components,
        summaries(X[rows], mean, scale, components),
        np.asarray(probabilities, dtype=np.float32)[rows],
        np.asarray(labels, dtype=np.int8)[rows],
        sites[rows].astype("<U40"),
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
        arrays["sites"],
    )


def load(path: str | Path) -> Reference:
    with np.load(path, allow_pickle=False) as data:
        return from_arrays(data)
