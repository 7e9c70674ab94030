"""The challenger in shadow: every answered film is scored by it too, off the request path.

MLflow has no traffic splitting of its own: that belongs to the serving layer. The version with
the alias `challenger` (HM_CHALLENGER_ALIAS) is followed like the Production one, by a model
holder of its own; after each answer the film goes to one thread of lower priority, whose score
goes to the prediction log under the same prediction id (`shadow_predictions`). Nobody sees it:
`/api/monitoring` compares both versions on the films readers labelled, and `hm-mlflow promote
challenger` moves the alias through the gate with that evidence. At most `max_waiting` films
(and `budget` bytes) wait; beyond that a film is skipped, and counted.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from hm_mlflow.monitoring.recorder import Recorder
from hm_mlflow.monitoring.store import ShadowRecord, now
from hm_mlflow.serve.limits import lower_priority
from hm_mlflow.serve.model_holder import ModelHolder, ServingModel

log = logging.getLogger(__name__)


class Shadow:
    def __init__(
        self,
        holder: ModelHolder,
        recorder: Recorder,
        counter=None,
        max_waiting: int = 8,
        budget: int = 64 * 2**20,
    ) -> None:
        self.holder = holder
        self.recorder = recorder
        self.counter = counter  # a prometheus Counter with an `outcome` label, or None
        self.max_waiting = max_waiting
        self.budget = budget
        self._waiting = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, "hm-shadow", initializer=lower_priority)

    @property
    def version(self) -> str | None:
        current = self.holder.current
        return current.version if current else None

    def submit(
        self, prediction_id: str, image: bytes, cost: int, champion: str, site: str | None = None
    ) -> bool:
        """Score `image` with the challenger later; False when there is none to score it (or
        it is the champion itself) or too much waits already."""
        challenger = self.holder.current
        if challenger is None or challenger.version == champion:
            return False
        with self._lock:
            if self._waiting >= self.max_waiting or (
                self._waiting and self._bytes + cost > self.budget
            ):
                self._count("skipped")
                return False
            self._waiting += 1
            self._bytes += cost
        self._pool.submit(self._score, challenger, prediction_id, image, cost, site)
        return True

    def _score(
        self, challenger: ServingModel, prediction_id: str, image: bytes, cost: int, site
    ) -> None:
        try:
            prediction = challenger.predict(image, site)
            self.recorder.shadow(
                ShadowRecord(
                    prediction_id,
                    challenger.version,
                    now(),
                    prediction.probability,
                    prediction.label,
                    prediction.threshold,
                    prediction.summary,
                )
            )
            self._count("scored")
        except Exception as exc:  # the challenger's failure is nobody's answer
            log.warning("challenger %s failed on %s: %s", challenger.version, prediction_id, exc)
            self._count("failed")
        finally:
            with self._lock:
                self._waiting -= 1
                self._bytes -= cost

    def _count(self, outcome: str) -> None:
        if self.counter is not None:
            self.counter.labels(outcome).inc()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
