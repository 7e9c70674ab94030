"""The logged model: chest X-ray image bytes in, label and probability out.

MLflow copies this file into every model it logs ("models from code") and runs the copy when the
model is loaded. Beside it, the model carries `features.py` as it was at training time, the fitted
estimator (skops) and its configuration (threshold, labels). So a model needs no hm_mlflow
package to predict, and an old version keeps the preprocessing it was trained with.

Input: a DataFrame with a binary column `image` (JPEG or PNG bytes; base64 strings when they
arrive as JSON at `mlflow models serve`). Output: a DataFrame with `label` and `probability`,
the probability of PNEUMONIA. The parameter `threshold` overrides the model's own cut.
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
        self.labels = list(config["labels"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [_as_bytes(v) for v in model_input["image"]]
        if len(images) > 4:
            with ThreadPoolExecutor() as pool:  # OpenCV releases the GIL while it decodes
                vectors = list(pool.map(self.features.extract, images))
        else:
            vectors = [self.features.extract(image) for image in images]
        probability = self.estimator.predict_proba(np.stack(vectors))[:, 1]
        threshold = float((params or {}).get("threshold") or self.threshold)
        label = np.where(probability >= threshold, self.labels[1], self.labels[0])
        return pd.DataFrame({"label": label, "probability": probability})


set_model(ChestXrayClassifier())
