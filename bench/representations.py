"""Learned representations side by side on real chest X-rays (../shared/data/cxr), from one run.

Three recipes on the same prepared films (`train.prepare`: descriptors, augmented copies, the
transfer panel, the trunk's inputs), the same folds and the same estimator, calibration and
operating point (`train.cross_validate`):

- descriptors alone (HM_TRUNK=false's model);
- descriptors + the learned trunk's embedding (hm_mlflow.trunk, the default: a small CNN);
- descriptors + a patch dictionary learned by k-means (Coates and Ng, "An analysis of
  single-layer networks in unsupervised feature learning", AISTATS 2011): 6 x 6 patches of the
  trunk's 96 x 96 input, each normalised for brightness and contrast, ZCA-whitened; K
  centroids by k-means; each patch encoded by the "triangle" activation max(0, mean_k(d) - d_k)
  of its distances d to the centroids, at a stride of 2; the codes averaged over the four
  quadrants (4 K values). A fold's dictionary is learned from that fold's training films only,
  as a fold's trunk is trained on them only.

Each is scored under grouped CV, the transfer panel and the framing-matched estimate, and on
`val` by a model fitted on every training film. The dictionary runs here as NumPy matrix
products over each batch's patches (`cv2.filter2D` could give the dot products with the
centroids, not the per-patch normalisation); it is measured, not shipped.

    .venv/bin/python bench/representations.py [--data ../shared/data/cxr] [--folds 3]
        [--copies 2] [--atoms 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.cluster import KMeans

from hm_mlflow import extraction, features, modeling, train
from hm_mlflow.config import Settings
from hm_mlflow.dataset import list_split
from hm_mlflow.metrics import binary_metrics

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
PATCH, STRIDE = 6, 2


def _patches(inputs: np.ndarray) -> np.ndarray:
    """Every PATCH x PATCH patch of (n, side, side) inputs at STRIDE, brightness and contrast
    normalised: (n, rows, cols, PATCH * PATCH)."""
    windows = sliding_window_view(inputs, (PATCH, PATCH), axis=(1, 2))[:, ::STRIDE, ::STRIDE]
    flat = windows.reshape(*windows.shape[:3], PATCH * PATCH).astype(np.float32)
    flat = flat - flat.mean(axis=-1, keepdims=True)
    return flat / np.sqrt(flat.var(axis=-1, keepdims=True) + 0.01)


@dataclasses.dataclass
class PatchDictionary:
    """K centroids of whitened patches, and the encoder that turns films into 4 K values."""

    mean: np.ndarray  # (P,) of the normalised patches
    whiten: np.ndarray  # (P, P) ZCA
    centroids: np.ndarray  # (K, P) in the whitened space

    @property
    def width(self) -> int:
        return 4 * len(self.centroids)

    @classmethod
    def learn(cls, inputs: np.ndarray, atoms: int, seed: int, per_film: int = 100):
        rng = np.random.default_rng(seed)
        patches = _patches(inputs)
        n, rows, cols, size = patches.shape
        pick = rng.integers(0, rows * cols, (n, per_film))
        sample = patches.reshape(n, rows * cols, size)[np.arange(n)[:, None], pick]
        sample = sample.reshape(-1, size)
        mean = sample.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(sample - mean, rowvar=False))
        whiten = vectors @ np.diag(1 / np.sqrt(values + 0.1)) @ vectors.T
        kmeans = KMeans(atoms, n_init=1, random_state=seed).fit((sample - mean) @ whiten)
        return cls(mean, whiten.astype(np.float32), kmeans.cluster_centers_.astype(np.float32))

    def embed(self, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
        """(n, side, side) trunk inputs -> (n, 4 K) quadrant means of the triangle codes."""
        out = []
        squared = (self.centroids**2).sum(axis=1)
        for start in range(0, len(inputs), batch):
            z = _patches(np.asarray(inputs[start : start + batch], np.float32)) - self.mean
            z = z @ self.whiten
            d2 = (z**2).sum(axis=-1, keepdims=True) - 2 * z @ self.centroids.T + squared
            d = np.sqrt(np.maximum(d2, 0))
            codes = np.maximum(d.mean(axis=-1, keepdims=True) - d, 0)
            half_r, half_c = codes.shape[1] // 2, codes.shape[2] // 2
            quadrants = [
                codes[:, :half_r, :half_c], codes[:, :half_r, half_c:],
                codes[:, half_r:, :half_c], codes[:, half_r:, half_c:],
            ]  # fmt: skip
            out.append(np.concatenate([q.mean(axis=(1, 2)) for q in quadrants], axis=1))
        return np.concatenate(out).astype(np.float32)


def with_dictionary(atoms: int):
    """A stand-in for `train.with_trunk` that learns a patch dictionary instead of a trunk."""

    def fit(prepared, index, settings, progress, desc, shifted=True):
        chosen = np.arange(len(prepared.y)) if index is None else np.asarray(index)
        inputs = prepared.views[0, chosen].astype(np.float32)
        dictionary = PatchDictionary.learn(inputs, atoms, settings.seed)
        full, X_shifted = train.with_embedding(prepared, index, dictionary, shifted)
        return train.WithTrunk(full, X_shifted, trained=dictionary, network=None)

    return fit


def four(metrics: dict, prefix: str = "") -> str:
    names = ("accuracy", "roc_auc", "sensitivity", "specificity")
    return "/".join(f"{metrics[prefix + k]:.3f}" for k in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--atoms", type=int, default=128)
    args = parser.parse_args()
    settings = Settings(cv_folds=args.folds, augment_copies=args.copies)
    started = time.perf_counter()
    prepared = train.prepare(args.data, settings, progress=False)
    val = list_split(args.data, "val")
    val_x = extraction.extract_features(val, settings.n_workers, trunk=True, progress=False)
    y_val = np.array([s.label for s in val])
    print(
        f"prepared {len(prepared.y)} films and {len(val)} val films in "
        f"{time.perf_counter() - started:.0f} s ({args.folds} folds, {args.copies} copies)"
    )

    def final_trunk(full: train.WithTrunk) -> np.ndarray:
        served = features.Trunk(full.trained.onnx)
        return np.concatenate([val_x.X, served.embed(val_x.views[0].astype(np.float32))], 1)

    def final_dictionary(full: train.WithTrunk) -> np.ndarray:
        return np.concatenate([val_x.X, full.trained.embed(val_x.views[0])], 1)

    recipes = {
        "descriptors alone": (None, None),
        "descriptors + trunk (default)": (train.with_trunk, final_trunk),
        f"descriptors + k-means, K={args.atoms}": (with_dictionary(args.atoms), final_dictionary),
    }
    original = train.with_trunk
    rows = {}
    for name, (fit, val_features) in recipes.items():
        started = time.perf_counter()
        if fit is None:
            scored = dataclasses.replace(prepared, views=None)
            done = train.cross_validate(scored, settings, progress=False)
            model = modeling.fit_calibrated(
                scored.data, None, prepared.params, settings.cv_folds, settings.seed
            )
            X_val = val_x.X
        else:
            train.with_trunk = fit
            try:
                done = train.cross_validate(prepared, settings, progress=False)
                full = fit(prepared, None, settings, False, "final", shifted=False)
            finally:
                train.with_trunk = original
            model = modeling.fit_calibrated(
                full.data, None, prepared.params, settings.cv_folds, settings.seed
            )
            X_val = val_features(full)
        m = done.metrics
        scored_val = binary_metrics(y_val, model.predict_proba(X_val)[:, 1], done.threshold)
        rows[name] = (m, scored_val, time.perf_counter() - started)
        print(f"{name}: {rows[name][2]:.0f} s", flush=True)

    print("\naccuracy / ROC AUC / sensitivity / specificity at each recipe's operating point")
    print("| recipe | CV (out of fold) | transfer panel | framing-matched | val | time |")
    print("|" + " --- |" * 6)
    for name, (m, v, seconds) in rows.items():
        cells = [four(m, f"{p}_") for p in ("cv_oof", "transfer", "framed")] + [four(v)]
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
