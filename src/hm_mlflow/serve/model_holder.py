"""The model the webapp serves: the version holding the Production alias, followed by itself.

A background loop asks the registry which version holds the alias every HM_REFRESH_SECONDS;
a new version is loaded off the request path and swapped in with one reference assignment, so a
request keeps the model it started with (`current` is read once per request) and its answer
names that version. The alias removed withdraws the model (503 "withdrawn"); a registry that
cannot be reached leaves the current model in service and `/health` says degraded. Registry calls
and model loads have time limits: a hung call never blocks later swaps.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import pandas as pd

from hm_mlflow.explain import Explanation, NotExplainable, occlusion
from hm_mlflow.monitoring.reference import Reference
from hm_mlflow.monitoring.reference import from_arrays as reference_from_arrays
from hm_mlflow.packaging import recorded_checksums
from hm_mlflow.registry import Registry
from hm_mlflow.serve.model_card import model_card

log = logging.getLogger(__name__)

# States of the holder, as /health and /ready report them
LOADING, SERVING, NO_MODEL, WITHDRAWN = "loading", "serving", "no_model", "withdrawn"


class ModelFailure(Exception):
    """The model failed on an image for a reason other than the image itself."""


class ModelRefused(Exception):
    """A version that must not be run (altered files, or none recorded); says which and why."""


@contextmanager
def _model_errors():
    """What a model raises on one image, sorted: a ValueError (OpenCV's own refusal of the
    bytes included) means the image cannot be read, NotExplainable passes, anything else is a
    ModelFailure."""
    try:
        yield
    except (ValueError, NotExplainable):
        raise
    except cv2.error as exc:
        raise ValueError(str(exc).splitlines()[-1] if str(exc) else "unreadable") from exc
    except Exception as exc:
        raise ModelFailure(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    version: str
    threshold: float
    film: np.ndarray | None  # the decoded, cropped film (for the page's thumbnail), if known
    summary: np.ndarray | None = None  # the film's compact features, for drift, if the model has


@dataclass(frozen=True)
class ServingModel:
    """A loaded model version and what the page says about it."""

    model: object  # mlflow.pyfunc.PyFuncModel
    name: str
    version: str
    trained_at: str | None
    synthetic: bool
    threshold: float
    labels: tuple[str, str] = ("NORMAL", "PNEUMONIA")
    fast: object | None = field(default=None, repr=False)  # the python model's classify()
    directory: str | None = None  # the verified copy it was loaded from
    python_model: object | None = field(default=None, repr=False)  # for occlusion maps
    about: dict = field(default_factory=dict)  # the model card: data, metrics, links
    site_thresholds: dict[str, float] = field(default_factory=dict)  # sites' own cuts

    @classmethod
    def load(cls, name: str, version: str, recorded: dict[str, str] | None) -> ServingModel:
        """Download the version's files, check them against the checksums recorded when it
        was registered (`recorded`), and load that very copy. A model is code this process
        will run: one altered in the store after registration is refused (ModelRefused)."""
        import tempfile

        import mlflow

        from hm_mlflow.packaging import checksum_mismatches

        if not recorded:
            raise ModelRefused(
                f"version {version} has no checksums recorded at registration, so its files "
                "cannot be trusted: it is not loaded"
            )
        directory = tempfile.mkdtemp(prefix="hm-model-")
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=directory)
        changed = checksum_mismatches(local, recorded)
        if changed:
            shutil.rmtree(directory, ignore_errors=True)
            raise ModelRefused(
                f"version {version}'s files do not match the checksums recorded at "
                f"registration ({', '.join(changed)}): it is not loaded"
            )
        model = mlflow.pyfunc.load_model(local)
        config = model.model_config
        python_model = model.unwrap_python_model()
        return cls(
            model=model,
            name=name,
            version=str(version),
            trained_at=config.get("trained_at"),
            synthetic=bool(config.get("synthetic")),
            threshold=float(config["threshold"]),
            labels=tuple(config.get("labels", cls.labels)),
            fast=getattr(python_model, "classify", None),
            directory=directory,
            python_model=python_model,
            site_thresholds={k: float(v) for k, v in (config.get("site_thresholds") or {}).items()},
        )

    def predict(self, image: bytes, site: str | None = None) -> Prediction:
        """Label and probability of one image (JPEG or PNG bytes), at the site's operating
        point. A ValueError means the model could not read the image; anything else is a
        ModelFailure."""
        summary = None
        with _model_errors():
            analyse = getattr(self.python_model, "analyse", None)
            if analyse is not None:
                probability, film, summary = analyse(image)
            elif self.fast is not None:  # logged before the drift reference existed
                probability, film = self.fast(image)
            else:  # a version logged before classify() existed
                row = self.model.predict(pd.DataFrame({"image": [image]})).iloc[0]
                probability, film = float(row["probability"]), None
        threshold = self.threshold_for(site)
        return Prediction(
            self.label_of(probability, site), probability, self.version, threshold, film, summary
        )

    @functools.cached_property
    def reference(self) -> Reference | None:
        """The drift reference this version was saved with (hm_mlflow.monitoring.reference),
        or None."""
        arrays = getattr(self.python_model, "reference", None)
        return reference_from_arrays(arrays) if arrays else None

    def threshold_for(self, site: str | None) -> float:
        """The site's own operating point when this version has one, else its threshold."""
        return self.site_thresholds.get(site or "", self.threshold)

    def label_of(self, probability: float, site: str | None = None) -> str:
        """The answer at this version's decision threshold (the site's, if it has one)."""
        return self.labels[1] if probability >= self.threshold_for(site) else self.labels[0]

    def explain(self, image: bytes) -> Explanation:
        """The occlusion map of one image under this version (`hm_mlflow.explain`). A
        ValueError means the image could not be read; NotExplainable, that this version cannot
        be explained; anything else is a ModelFailure."""
        with _model_errors():
            return occlusion(self.python_model, image)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "trained_at": self.trained_at,
            "synthetic": self.synthetic,
            "threshold": self.threshold,
        }


def _with_timeout(function, seconds: float, what: str):
    """Run `function` in a daemon thread and wait at most `seconds`: a hung call raises
    TimeoutError here and is abandoned (its thread ends with the process)."""
    box: dict = {}

    def run():
        try:
            box["value"] = function()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"hm-{what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"{what} took longer than {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class ModelHolder:
    """Holds the current Production model; `refresh()` follows the registry alias."""

    def __init__(
        self,
        name: str,
        alias: str,
        tracking_uri: str,
        registry_timeout: float = 10.0,
        load_timeout: float = 120.0,
        ui_url: str | None = None,
    ) -> None:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve through it
        self.registry = Registry(name, alias, MlflowClient(tracking_uri=tracking_uri))
        self.registry_timeout = registry_timeout
        self.load_timeout = load_timeout
        self.ui_url = ui_url  # the MLflow UI as a browser reaches it, for the model card's links
        self._current: ServingModel | None = None
        self._lock = threading.Lock()  # one refresh at a time; readers never wait
        self.state = LOADING
        self.registry_reachable: bool | None = None
        self.last_check: float | None = None
        self.last_error: str | None = None  # for the log and the operator, never for clients
        self.refused: dict | None = None  # the version whose files failed their checksums
        self.loads = 0

    @property
    def current(self) -> ServingModel | None:
        """The model to answer one request with: read it once per request."""
        return self._current

    def refresh(self) -> bool:
        """Swap in the version holding the alias if it is not the one served; True on a swap.

        An unreachable registry or a model that does not load keeps the current model; the
        alias removed withdraws it.
        """
        if not self._lock.acquire(blocking=False):
            return False  # a slow refresh is still running: this one is not needed
        try:
            return self._refresh()
        finally:
            self.last_check = time.time()
            self._lock.release()

    def _refresh(self) -> bool:
        name = self.registry.name
        try:
            version = _with_timeout(self.registry.production, self.registry_timeout, "registry")
        except Exception as exc:
            self.registry_reachable = False
            self.last_error = f"registry: {type(exc).__name__}: {exc}"
            log.warning("model registry unreachable: %s", self.last_error)
            if self._current is None and self.state == LOADING:
                self.state = NO_MODEL
            return False
        self.registry_reachable = True
        if version is None:
            if self._current is not None:
                log.warning("alias removed: withdrawing %s version %s", name, self._current.version)
                self._current = None
                self.state = WITHDRAWN
            elif self.state != WITHDRAWN:
                self.state = NO_MODEL
            self.last_error = None
            return False
        wanted = str(version.version)
        if self._current is not None and self._current.version == wanted:
            self.last_error = None
            return False
        if self.refused and self.refused["version"] == wanted:
            return False  # refused once: not downloaded again until the alias moves
        recorded = recorded_checksums(version)
        try:
            loaded = _with_timeout(
                lambda: ServingModel.load(name, wanted, recorded),
                self.load_timeout,
                "model load",
            )
        except ModelRefused as exc:
            self.refused = {"version": wanted, "reason": str(exc)}
            log.error("refusing %s: %s", name, exc)
            if self._current is None:
                self.state = NO_MODEL
            return False
        except Exception as exc:
            self.last_error = f"loading version {wanted}: {type(exc).__name__}: {exc}"
            log.error("%s", self.last_error)
            if self._current is None:
                self.state = NO_MODEL
            return False
        loaded = replace(loaded, about=self._card(version))
        previous, self._current = self._current, loaded  # requests in flight keep theirs
        self.state = SERVING
        self.refused = None
        if previous is not None and previous.directory:
            shutil.rmtree(previous.directory, ignore_errors=True)  # loaded: files not needed
        self.last_error = None
        self.loads += 1
        log.info("serving %s version %s (alias %s)", name, wanted, self.registry.alias)
        return True

    def _card(self, version) -> dict:
        """The version's model card; a card that cannot be read never stops the model."""
        try:
            return _with_timeout(
                lambda: model_card(self.registry.client, version, self.ui_url),
                self.registry_timeout,
                "model card",
            )
        except Exception as exc:
            log.warning(
                "no model card for version %s: %s: %s", version.version, type(exc).__name__, exc
            )
            return {
                "name": self.registry.name,
                "version": str(version.version),
                "unavailable": True,
            }

    def status(self) -> dict:
        """What /health and /ready say: no URI and no exception text."""
        current = self._current
        degraded = self.registry_reachable is False or (
            self.last_error is not None and current is not None
        )
        return {
            "status": "degraded" if degraded or self.refused else "ok",
            "state": self.state,
            "model_loaded": current is not None,
            "model": current.describe() if current else None,
            "registry_reachable": self.registry_reachable,
            "refused": self.refused,
            "last_check": self.last_check,
        }
