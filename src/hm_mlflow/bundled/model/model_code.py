"""The logged model: chest X-ray image bytes in, label and probability out.

MLflow copies this file into every model it logs ("models from code") and runs the copy when the
model is loaded. Beside it, the model carries `features.py` as it was at training time, the fitted
estimator (skops), its configuration (threshold, labels) and, since feature version 5, the
learned trunk as an ONNX graph (`trunk.onnx`, run by OpenCV's DNN module). So a model needs no
hm_mlflow package to predict, and an old version keeps the preprocessing it was trained with.

When the model was trained with a drift reference (`reference.npz`, hm_mlflow.monitoring.reference),
`analyse` also gives each film's compact feature summary, the one the prediction log keeps.

Input: a DataFrame with a binary column `image` (JPEG or PNG bytes; base64 strings when they
arrive as JSON at `mlflow models serve`). Output: a DataFrame with `label` and `probability`,
the probability of PNEUMONIA. The parameter `threshold` overrides the model's own cut; the
parameter `site` applies that site's own operating point when the model has one (a site whose
readers labelled enough films when it was trained, hm_mlflow.train).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def _load_features(path: str):
    """Import the model's own copy of features.py under a name unique to its content."""
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(f"hm_model_features_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_estimator(path: str):
    """Load the skops file, trusting only scikit-learn, NumPy and SciPy types."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=path)
    foreign = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise ValueError(f"refusing to load estimator with unexpected types: {foreign}")
    return skops.io.load(path, trusted=untrusted)


def _load_reference(path: str | None) -> dict[str, np.ndarray] | None:
    """The drift reference's arrays (plain arrays only: nothing in it is unpickled)."""
    if not path:
        return None
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class LinearVote:
    """The fitted estimator, collapsed: every view of the recipe is linear, so one row costs
    a (folds x views x features) product, not a trip through scikit-learn's validation.

    The estimator is a CalibratedClassifierCV (sigmoid) over folds, each a soft VotingClassifier
    of Pipelines [optional column selection (np.take), StandardScaler, LogisticRegression].
    Each view's scaler and weights fold into one weight vector over all features:
    P = mean over folds of expit(-(a * mean over views of expit(x.w + b) + c)).
    `from_estimator` returns None for any other structure (then predict_proba is used).
    """

    def __init__(self, weights: np.ndarray, bias: np.ndarray, a: np.ndarray, c: np.ndarray):
        self.weights = weights  # (folds, views, features)
        self.bias = bias  # (folds, views)
        self.a, self.c = a, c  # (folds,) the sigmoid calibrators

    @classmethod
    def from_estimator(cls, estimator, n_features: int):
        try:
            folds = [cls._fold(c, n_features) for c in estimator.calibrated_classifiers_]
        except (AttributeError, TypeError, ValueError, KeyError, IndexError):
            return None
        if not folds or any(f is None for f in folds):
            return None
        weights = np.stack([f[0] for f in folds])
        bias = np.stack([f[1] for f in folds])
        a = np.array([f[2] for f in folds])
        c = np.array([f[3] for f in folds])
        return cls(weights, bias, a, c)

    @staticmethod
    def _fold(calibrated, n_features: int):
        voting, (calibrator,) = calibrated.estimator, calibrated.calibrators
        if calibrated.method != "sigmoid" or voting.voting != "soft" or voting.weights:
            return None
        if list(voting.classes_) != [0, 1]:
            return None
        views_w, views_b = [], []
        for pipeline in voting.estimators_:
            *steps, scaler, classifier = [step for _, step in pipeline.steps]
            columns = np.arange(n_features)
            for step in steps:  # np.take over an index array, and nothing else
                if getattr(step, "func", None) is not np.take or step.inverse_func is not None:
                    return None
                columns = columns[np.asarray(step.kw_args["indices"])]
            if type(scaler).__name__ != "StandardScaler" or not hasattr(classifier, "coef_"):
                return None
            mean = scaler.mean_ if scaler.with_mean else 0.0
            scale = scaler.scale_ if scaler.with_std else 1.0
            coef = classifier.coef_[0] / scale
            full = np.zeros(n_features)
            np.add.at(full, columns, coef)
            views_w.append(full)
            views_b.append(classifier.intercept_[0] - float(np.sum(coef * mean)))
        return np.stack(views_w), np.array(views_b), calibrator.a_, calibrator.b_

    def probability(self, X: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) of each row of X (n, features)."""
        X = np.asarray(X, dtype=np.float64)
        scores = np.einsum("nd,fvd->nfv", X, self.weights) + self.bias  # (n, folds, views)
        vote = _expit(scores).mean(axis=2)  # (n, folds)
        return _expit(-(self.a * vote + self.c)).mean(axis=1)


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # JSON transport (mlflow models serve) carries base64
        return base64.b64decode(value)
    raise TypeError(f"expected image bytes, got {type(value).__name__}")


class ChestXrayClassifier(PythonModel):
    """Features from the model's own copy of features.py, then the calibrated estimator."""

    def load_context(self, context) -> None:
        self.features = _load_features(context.artifacts["features"])
        self.estimator = _load_estimator(context.artifacts["estimator"])
        config = context.model_config
        self.threshold = float(config["threshold"])
        self.site_thresholds = {
            k: float(v) for k, v in (config.get("site_thresholds") or {}).items()
        }
        self.labels = list(config["labels"])
        trunk = context.artifacts.get("trunk")
        self.trunk = None
        if trunk:  # the learned representation: an ONNX graph OpenCV runs
            with open(trunk, "rb") as handle:
                self.trunk = self.features.Trunk(handle.read())
        width = self.features.n_features(self.trunk)
        self.linear = LinearVote.from_estimator(self.estimator, width)
        self.reference = _load_reference(context.artifacts.get("reference"))

    def probability(self, vectors: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) of feature vectors: the collapsed estimator when it could be built."""
        if self.linear is not None:
            return self.linear.probability(vectors)
        return self.estimator.predict_proba(vectors)[:, 1]

    def classify(self, image: bytes) -> tuple[float, np.ndarray]:
        """One image, without pandas: (P(PNEUMONIA), the decoded and cropped film the features
        were computed from, for a thumbnail). Raises the feature code's ValueError on an image
        it cannot read."""
        film = self.features.load(image)
        vector = self.features.from_image(film, self.trunk)
        return float(self.probability(vector[np.newaxis])[0]), film

    def extract(self, image: bytes) -> np.ndarray:
        """The feature vector of image bytes, with the trunk's embedding if the model has one."""
        return self.features.extract(image, self.trunk)

    def threshold_for(self, site: str | None) -> float:
        """The site's own operating point if the model has one, else the model's."""
        return self.site_thresholds.get(site or "", self.threshold)

    def summarise(self, vector: np.ndarray) -> np.ndarray | None:
        """The film's compact summary for drift: PCA coordinates of the standardised vector and
        the norm of the rest (float32), or None for a model without a reference."""
        ref = self.reference
        if ref is None:
            return None
        z = (np.atleast_2d(vector).astype(np.float64) - ref["mean"]) / ref["scale"]
        coords = z @ ref["components"].T.astype(np.float64)
        residual = np.sqrt(np.maximum((z * z).sum(axis=1) - (coords * coords).sum(axis=1), 0.0))
        return np.column_stack([coords, residual]).astype(np.float32)[0]

    def analyse(self, image: bytes) -> tuple[float, np.ndarray, np.ndarray | None]:
        """`classify`, and the film's summary for drift from the same features."""
        film = self.features.load(image)
        vector = self.features.from_image(film, self.trunk)
        probability = float(self.probability(vector[np.newaxis])[0])
        return probability, film, self.summarise(vector)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [_as_bytes(v) for v in model_input["image"]]
        if len(images) > 4:
            with ThreadPoolExecutor() as pool:  # OpenCV releases the GIL while it decodes
                vectors = list(pool.map(self.extract, images))
        else:
            vectors = [self.extract(image) for image in images]
        probability = self.probability(np.stack(vectors))
        params = params or {}
        threshold = float(params.get("threshold") or self.threshold_for(params.get("site")))
        label = np.where(probability >= threshold, self.labels[1], self.labels[0])
        return pd.DataFrame({"label": label, "probability": probability})


set_model(ChestXrayClassifier())
