"""What the webapp tells its operators: one JSON log line per request and Prometheus metrics.

A log line carries the time, method, route, status, latency, upload size, the model version
that answered, the outcome (ok, or the reason a request was refused) and the worker's process
id, never the image. Metrics,
served at /metrics:

    hm_requests_total{route, outcome}            requests by route and outcome
    hm_request_seconds{route, outcome}           latency histogram
    hm_rejections_total{reason}                  refused uploads and requests, by reason
    hm_images_in_flight                          images being decoded and classified now
    hm_model_version{version}                    1 for the version this worker serves
    hm_prediction_log_records_total{outcome}     answers written to the log, or dropped
    hm_prediction_log_errors_total               failed writes (retried)
    hm_prediction_log_pending                    answers waiting to be written
    hm_films_kept_total{outcome}                 films stored for labelling, dropped, failed
    hm_shadow_total{outcome}                     films the challenger scored, skipped, failed
    hm_feedback_total{outcome}                   readers' labels, by outcome
    hm_site_*{site, version}                     the monitoring report (below), per site

With several workers, each writes its samples to PROMETHEUS_MULTIPROC_DIR (set by `hm-mlflow
serve`) and /metrics adds them up, so whichever worker answers it tells the whole server's story.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from hm_mlflow.monitoring.recorder import Counters

access_log = logging.getLogger("hm_mlflow.access")

BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Own registry: several apps in one process (tests) must not collide. In multiprocess
        # mode the samples go to files whatever the registry, and /metrics collects them.
        self.registry = None if self.multiprocess else CollectorRegistry()
        kwargs = {"registry": self.registry}
        self.requests = Counter(
            "hm_requests", "Requests by route and outcome", ["route", "outcome"], **kwargs
        )
        self.latency = Histogram(
            "hm_request_seconds",
            "Request latency by route and outcome",
            ["route", "outcome"],
            buckets=BUCKETS,
            **kwargs,
        )
        self.rejections = Counter(
            "hm_rejections", "Refused uploads and requests by reason", ["reason"], **kwargs
        )
        self.in_flight = Gauge(
            "hm_images_in_flight",
            "Images being decoded and classified",
            multiprocess_mode="livesum",
            **kwargs,
        )
        self.model_version = Gauge(
            "hm_model_version",
            "1 for the model version this worker serves",
            ["version"],
            multiprocess_mode="liveall",
            **kwargs,
        )
        self.log_records = Counter(
            "hm_prediction_log_records",
            "Answers written to the prediction log, or dropped",
            ["outcome"],
            **kwargs,
        )
        self.log_errors = Counter(
            "hm_prediction_log_errors", "Failed writes to the prediction log (retried)", **kwargs
        )
        self.log_pending = Gauge(
            "hm_prediction_log_pending",
            "Answers waiting to be written to the prediction log",
            multiprocess_mode="livesum",
            **kwargs,
        )
        self.films = Counter(
            "hm_films_kept", "Films stored for labelling, by outcome", ["outcome"], **kwargs
        )
        self.shadow = Counter(
            "hm_shadow",
            "Films scored by the challenger in shadow, by outcome",
            ["outcome"],
            **kwargs,
        )
        self.feedback = Counter(
            "hm_feedback", "Readers' labels received, by outcome", ["outcome"], **kwargs
        )
        self._version: str | None = None

    def recorder_counters(self) -> RecorderCounters:
        return RecorderCounters(self)

    def serving(self, version: str | None) -> None:
        if version == self._version:
            return
        if self._version is not None:
            self.model_version.labels(self._version).set(0)
        if version is not None:
            self.model_version.labels(version).set(1)
        self._version = version

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RecorderCounters(Counters):
    """The prediction log recorder's counts, as Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def written(self, n: int) -> None:
        self.metrics.log_records.labels("written").inc(n)

    def dropped(self, n: int) -> None:
        self.metrics.log_records.labels("dropped").inc(n)

    def failed(self) -> None:
        self.metrics.log_errors.inc()

    def pending(self, delta: int) -> None:
        self.metrics.log_pending.inc(delta)

    def film(self, outcome: str) -> None:
        self.metrics.films.labels(outcome).inc()


def site_metrics(report: dict) -> bytes:
    """The monitoring report as Prometheus gauges, per site and version (computed from the
    database by whichever worker answers /metrics, so never counted twice)."""
    registry = CollectorRegistry()
    labels = ["site", "version"]

    def gauge(name: str, text: str, names=labels) -> Gauge:
        return Gauge(name, text, names, registry=registry)

    films = gauge("hm_site_films", "Films answered at a site, by version")
    positive = gauge("hm_site_positive_rate", "Share of films answered PNEUMONIA")
    labelled = gauge("hm_site_labelled", "Films a reader labelled")
    rates = {
        name: gauge(f"hm_site_{name}", f"{name} on the labelled films (point estimate)")
        for name in ("sensitivity", "specificity", "accuracy", "roc_auc")
    }
    drift_score = gauge("hm_site_drift_score", "Input drift: domain classifier ROC AUC")
    drift_threshold = gauge("hm_site_drift_threshold", "Input drift: the score's threshold")
    drifting = gauge("hm_site_drifting", "1 when the site's films drift from training")
    for site in report.get("sites", []):
        for entry in site["versions"]:
            key = (site["site"], entry["version"])
            films.labels(*key).set(entry["films"])
            if entry["positive_rate"] is not None:
                positive.labels(*key).set(entry["positive_rate"])
            labelled.labels(*key).set(entry["labelled"]["n"])
            for name, metric in rates.items():
                value = entry["labelled"][name]["value"]
                if value is not None:
                    metric.labels(*key).set(value)
        drift = site.get("drift")
        if drift:
            key = (site["site"], drift["version"])
            test = drift["input"]
            if test["score"] is not None:
                drift_score.labels(*key).set(test["score"])
                drift_threshold.labels(*key).set(test["threshold"])
            drifting.labels(*key).set(1 if drift["drifting"] else 0)
    return generate_latest(registry)


class AccessLog:
    """ASGI middleware: one JSON line per request, and the request metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        status = 500
        upload = dict(scope.get("headers") or []).get(b"content-length")

        async def watched_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            elapsed = time.perf_counter() - started
            state = scope["state"]
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            outcome = state.get("outcome") or ("ok" if status < 400 else f"http_{status}")
            self.metrics.requests.labels(route, outcome).inc()
            self.metrics.latency.labels(route, outcome).observe(elapsed)
            access_log.info(
                json.dumps(
                    {
                        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "method": scope.get("method"),
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 2),
                        "upload_bytes": int(upload) if upload and upload.isdigit() else None,
                        "model_version": state.get("model_version"),
                        "outcome": outcome,
                        "worker": os.getpid(),
                    }
                )
            )


def configure_logging() -> None:
    """Access lines as bare JSON on stderr; uvicorn's own access log is off."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.handlers[:] = [handler]
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
