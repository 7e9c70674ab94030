"""The model the webapp serves: the version holding the Production alias, swapped without
a restart when the alias moves."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow import MlflowClient

from hm_mlflow.registry import Registry
from hm_mlflow.tracking import require_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """A loaded model and what the page says about it."""

    model: mlflow.pyfunc.PyFuncModel
    name: str
    version: str
    trained_at: str | None
    synthetic: bool
    threshold: float

    def predict(self, image: bytes) -> tuple[str, float]:
        """(label, probability of PNEUMONIA) for one image."""
        row = self.model.predict(pd.DataFrame({"image": [image]})).iloc[0]
        return str(row["label"]), float(row["probability"])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "trained_at": self.trained_at,
            "synthetic": self.synthetic,
            "threshold": self.threshold,
        }


class ModelHolder:
    """Holds the current Production model; `refresh()` follows the registry alias."""

    def __init__(self, name: str, alias: str, tracking_uri: str) -> None:
        mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve through it
        self.registry = Registry(name, alias, MlflowClient(tracking_uri=tracking_uri))
        self.tracking_uri = tracking_uri
        self._current: ServingModel | None = None
        self._lock = threading.Lock()  # one refresh at a time; readers never wait
        self.last_check: float | None = None
        self.last_error: str | None = None

    @property
    def current(self) -> ServingModel | None:
        return self._current

    def refresh(self) -> bool:
        """Load the version holding the alias if it is not the one served. True on a swap.

        Failures (MLflow unreachable, a model that does not load) are kept in `last_error`;
        the model already served, if any, stays in service.
        """
        with self._lock:
            try:
                swapped = self._refresh()
                self.last_error = None
                return swapped
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("model refresh failed: %s", self.last_error)
                return False
            finally:
                self.last_check = time.time()

    def _refresh(self) -> bool:
        # A quick look first: MLflow's own client would retry a dead server for minutes.
        require_server(self.tracking_uri, wait=0)
        version = self.registry.production()
        name, alias = self.registry.name, self.registry.alias
        if version is None:
            return False
        if self._current is not None and self._current.version == version.version:
            return False
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
        config = model.model_config
        self._current = ServingModel(
            model=model,
            name=name,
            version=str(version.version),
            trained_at=config.get("trained_at"),
            synthetic=bool(config.get("synthetic")),
            threshold=float(config["threshold"]),
        )
        log.info("serving %s version %s (alias %s)", name, version.version, alias)
        return True

    def status(self) -> dict:
        current = self._current
        return {
            "model_loaded": current is not None,
            "model": current.describe() if current else None,
            "registry": {
                "model": self.registry.name,
                "alias": self.registry.alias,
                "tracking_uri": self.tracking_uri,
            },
            "last_check": self.last_check,
            "last_error": self.last_error,
        }
