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
        self._version: str | None = None

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
