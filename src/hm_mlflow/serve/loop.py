"""The webapp's side of the loop: readers' labels in, live metrics and drift out.

    POST /api/feedback     {"prediction_id": ..., "label": "NORMAL" | "PNEUMONIA"} with
                           `Authorization: Bearer TOKEN` (hm-mlflow reviewer add NAME):
                           200 with the label recorded, 401 without a valid token, 404 for an
                           unknown prediction, 422 for a malformed body, 503 when the log is down
    GET  /api/monitoring   the monitoring report (hm_mlflow.monitoring.report); ?site= filters
    GET  /monitoring       the same as a page, with a banner for each site that drifts

The report is computed from the prediction log at most every HM_MONITOR_CACHE_SECONDS, off the
event loop; a drift test runs again only when a site's traffic changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from hm_mlflow.monitoring import report as reports
from hm_mlflow.monitoring.reviewers import authenticate
from hm_mlflow.monitoring.store import check_site
from hm_mlflow.serve.observability import site_metrics

log = logging.getLogger(__name__)

LOG_OFF = (
    "The prediction log is switched off on this server (HM_RECORD_PREDICTIONS=false): "
    "labels and monitoring are not available."
)
LOG_DOWN = "The prediction log cannot be reached just now; try again in a moment."
SIGN_IN = (
    "Only signed-in readers may label films: send 'Authorization: Bearer TOKEN' with a reader's "
    "token (hm-mlflow reviewer add NAME prints one)."
)
BAD_BODY = (
    'Send a JSON body {"prediction_id": "<the id of an answer>", "label": "NORMAL" or "PNEUMONIA"}.'
)
UNKNOWN = "No answer has the prediction id {id}: label an answer this server gave."
FOUND_AFTER = 1.0
"""Seconds a label waits for its answer to reach the log (another worker may hold it)."""


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    label: Literal["NORMAL", "PNEUMONIA"]


class ReportCache:
    """The report per site filter, at most `seconds` old; one computation at a time."""

    def __init__(self, compute, seconds: float) -> None:
        self.compute = compute
        self.seconds = seconds
        self._found: dict[str | None, tuple[float, dict]] = {}
        self._lock = asyncio.Lock()

    async def get(self, site: str | None) -> dict:
        cached = self._found.get(site)
        if cached and time.monotonic() - cached[0] <= self.seconds:
            return cached[1]
        async with self._lock:
            cached = self._found.get(site)
            if cached and time.monotonic() - cached[0] <= self.seconds:
                return cached[1]
            report = await asyncio.to_thread(self.compute, site)
            self._found[site] = (time.monotonic(), report)
            return report


@dataclass
class Loop:
    router: APIRouter
    reports: ReportCache | None

    async def site_metrics(self) -> bytes:
        """The report's figures for /metrics; nothing when the log is off or down."""
        if self.reports is None:
            return b""
        try:
            return site_metrics(await self.reports.get(None))
        except Exception as exc:
            log.warning("no site metrics: %s: %s", type(exc).__name__, exc)
            return b""


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def loop_routes(settings, store, recorder, holder, shadow, metrics, templates) -> Loop:
    """The loop's routes over the prediction log `store` (None when it is off)."""
    router = APIRouter()
    drift_cache = reports.DriftCache()

    def reference(version: str):
        for candidate in (holder, shadow.holder if shadow is not None else None):
            current = candidate.current if candidate is not None else None
            if current is not None and current.version == version:
                return current.reference
        return None

    def compute(site: str | None) -> dict:
        current = holder.current
        return reports.build(
            store,
            model_name=settings.model_name,
            production=current.version if current else None,
            challenger=shadow.version if shadow is not None else None,
            reference=reference,
            settings=settings,
            site=site,
            cache=drift_cache,
        )

    cache = ReportCache(compute, settings.monitor_cache_seconds) if store is not None else None

    def count(outcome: str) -> None:
        metrics.feedback.labels(outcome).inc()

    @router.get("/api/reviewer")
    async def who(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        """Which reader a token belongs to (the upload page's sign-in): 200 or 401."""
        if store is None:
            return _error(503, LOG_OFF)
        try:
            reviewer = await run_in_threadpool(authenticate, store, authorization)
        except Exception:
            return _error(503, LOG_DOWN, {"Retry-After": "5"})
        if reviewer is None:
            return _error(401, "This token is not a reader's, or it was revoked.")
        return JSONResponse({"reviewer": reviewer})

    @router.post("/api/feedback")
    async def feedback(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Record a reader's label for an answer (every label is kept; the latest wins)."""
        if store is None:
            return _error(503, LOG_OFF)
        try:
            reviewer = await run_in_threadpool(authenticate, store, authorization)
        except Exception as exc:
            log.error("reviewer lookup failed: %s: %s", type(exc).__name__, exc)
            count("log_down")
            return _error(503, LOG_DOWN, {"Retry-After": "5"})
        if reviewer is None:
            count("unauthorised")
            return _error(401, SIGN_IN, {"WWW-Authenticate": 'Bearer realm="hm-mlflow"'})
        try:
            body = FeedbackIn.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError):
            count("malformed")
            return _error(422, BAD_BODY)
        try:
            labels = await _label(body, reviewer)
        except KeyError:
            count("unknown")
            return _error(404, UNKNOWN.format(id=body.prediction_id))
        except Exception as exc:
            log.error("label not recorded: %s: %s", type(exc).__name__, exc)
            count("log_down")
            return _error(503, LOG_DOWN, {"Retry-After": "5"})
        count("recorded")
        return JSONResponse(
            {
                "prediction_id": body.prediction_id,
                "label": body.label,
                "reviewer": reviewer,
                "labels": labels,
            }
        )

    async def _label(body: FeedbackIn, reviewer: str) -> int:
        """Add the label; an answer still on its way to the log (this worker's queue, or
        another's) is waited for, briefly."""
        deadline = time.monotonic() + FOUND_AFTER
        while True:
            try:
                return await run_in_threadpool(
                    store.add_label, body.prediction_id, body.label, reviewer
                )
            except KeyError:
                if time.monotonic() > deadline:
                    raise
            if recorder is not None and recorder.pending():
                await asyncio.to_thread(recorder.flush, 0.5)
            else:
                await asyncio.sleep(0.1)

    async def report_or_error(site: str | None) -> dict | JSONResponse:
        if cache is None:
            return _error(503, LOG_OFF)
        try:
            checked = check_site(site) if site is not None else None
        except ValueError as exc:
            return _error(422, str(exc))
        try:
            return await cache.get(checked)
        except Exception as exc:
            log.error("monitoring report failed: %s: %s", type(exc).__name__, exc)
            return _error(503, LOG_DOWN, {"Retry-After": "5"})

    @router.get("/api/monitoring")
    async def monitoring(site: str | None = None) -> JSONResponse:
        """Live metrics per site and version, drift per site, the challenger beside the
        champion (hm_mlflow.monitoring.report)."""
        found = await report_or_error(site)
        return found if isinstance(found, JSONResponse) else JSONResponse(found)

    @router.get("/monitoring", response_class=HTMLResponse)
    async def monitoring_page(request: Request, site: str | None = None) -> HTMLResponse:
        found = await report_or_error(site)
        if isinstance(found, JSONResponse):
            error = json.loads(found.body)["detail"]
            return templates.TemplateResponse(
                request,
                "monitoring.html",
                status_code=found.status_code,
                context={"report": None, "error": error, "model": None, "site": site},
            )
        current = holder.current
        return templates.TemplateResponse(
            request,
            "monitoring.html",
            context={
                "report": found,
                "error": None,
                "model": current.describe() if current else None,
                "site": site,
            },
        )

    return Loop(router, cache)
