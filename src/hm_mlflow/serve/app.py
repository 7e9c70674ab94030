"""The webapp: an upload page for people, a JSON API for programs, both on the Production model.

Routes stay thin: checks live in `uploads`, limits in `limits`, the model in `model_holder`,
logs and metrics in `observability`. The model does its own preprocessing, so this module never
touches features. Every answer gets a prediction id and is recorded off the request path
(hm_mlflow.monitoring.recorder), with the client's site (form field `site` or header `X-Site`),
and the challenger scores the film in shadow (hm_mlflow.serve.shadow). Every refusal is a 4xx
or a 503 with a sentence; nothing a client sends makes a 500 or reaches a stack trace.

    GET  /              upload page
    POST /              the page with the answer
    POST /api/predict   JSON answer for programs (?thumbnail=true adds the film as a PNG)
    POST /api/explain   where the model looked: occlusion map as numbers and a PNG overlay
    POST /api/feedback  a reader's label for an answer (hm_mlflow.serve.loop)
    GET  /api/monitoring, /monitoring   live metrics and drift per site (hm_mlflow.serve.loop)
    GET  /health        liveness: ok or degraded, the model in service (no URI, no error text)
    GET  /ready         200 once a model is loaded, else 503
    GET  /metrics       Prometheus
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from hm_mlflow import __version__
from hm_mlflow.config import Settings, get_settings
from hm_mlflow.explain import CAPTION, Explanation, NotExplainable
from hm_mlflow.monitoring.films import FilmStore
from hm_mlflow.monitoring.recorder import Film, Recorder
from hm_mlflow.monitoring.store import PredictionLog, Record, check_site, now
from hm_mlflow.serve.limits import (
    Admission,
    BodyLimit,
    lower_priority,
    return_freed_buffers_to_the_system,
)
from hm_mlflow.serve.loop import loop_routes
from hm_mlflow.serve.model_holder import (
    LOADING,
    WITHDRAWN,
    ModelFailure,
    ModelHolder,
    Prediction,
    ServingModel,
)
from hm_mlflow.serve.observability import AccessLog, Metrics, configure_logging
from hm_mlflow.serve.shadow import Shadow
from hm_mlflow.serve.uploads import (
    ACCEPTED,
    HEAD_BYTES,
    TAIL_BYTES,
    CheckedImage,
    Inspected,
    Limits,
    UploadError,
    inspect,
    prepare,
)

log = logging.getLogger(__name__)
Upload = Annotated[UploadFile | None, File(description=f"the chest X-ray: {ACCEPTED}")]
SiteField = Annotated[str | None, Form(description="the site the film comes from")]
SiteHeader = Annotated[str | None, Header(alias="X-Site", description="or the site, as a header")]
HERE = Path(__file__).parent
THUMBNAIL = 320
NO_MODEL = (
    "No model is in production yet: the registry has no version of {name} with the "
    "alias '{alias}'. Train one (hm-mlflow train); it is picked up within {seconds:g} s."
)
NO_REGISTRY = "No model is loaded: the model registry cannot be reached. Retrying."
LOADING_MESSAGE = "The model is still loading; try again in a few seconds."
WITHDRAWN_MESSAGE = (
    "The model has been withdrawn from production (the alias '{alias}' was removed); no "
    "answer is given until a version holds it again."
)
BUSY = "The server is busy with other images; try again in a moment."
BUSY_EXPLAINING = "The server is busy making other heat maps; try again in a moment."
NOT_EXPLAINABLE = (
    "Model version {version} was saved in an older format that cannot make a heat map; "
    "its predictions are unaffected."
)
MAX_EXPLAINS_WAITING = 2
"""Occlusion maps per worker at once, running or queued (one runs at a time)."""
MODEL_FAILED = "The model failed on this image; try again, or try another image."


async def _refresh_loop(holder: ModelHolder, seconds: float, on_refresh=None) -> None:
    """Follow the registry alias; look more often while there is nothing to serve."""
    while True:
        try:
            await asyncio.to_thread(holder.refresh)
        except Exception:  # never let the loop die
            log.exception("model refresh failed")
        current = holder.current
        if on_refresh is not None:
            on_refresh(current.version if current else None)
        await asyncio.sleep(seconds if current else min(seconds, 5.0))


@dataclass(frozen=True)
class Classified:
    """One upload through the checks and the model: what the answer and the log need."""

    image: CheckedImage
    answer: object  # the work's result: a Prediction, or (Explanation, summary)
    serving: ServingModel
    upload: bytes  # as it arrived
    sha256: str  # of the upload
    cost: int  # its upload + decode bytes, as admitted


def _readable_time(iso: str) -> str:
    """2026-11-24T00:47:45+00:00 -> 2026-11-24 00:47 UTC"""
    try:
        moment = datetime.fromisoformat(iso).astimezone(UTC)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _predict(serving: ServingModel, data: bytes) -> Prediction:
    return serving.predict(data)


def _explain_and_summarise(serving: ServingModel, data: bytes):
    """The occlusion map, and the film's summary for the prediction log."""
    return serving.explain(data), serving.predict(data).summary


def _run_date(serving: ServingModel) -> dict:
    """The training date from the model card when the model's own config has none (the
    bundled model's)."""
    return {"trained_at": serving.trained_at or serving.about.get("trained_at")}


def _thumbnail(prediction: Prediction, image: CheckedImage) -> str:
    """A small PNG of the film for the page, from the model's own decode when it gave one."""
    film = prediction.film
    if film is None:  # an older model version: decode once more, at a reduced scale
        film = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    scale = THUMBNAIL / max(film.shape)
    if scale < 1:
        film = cv2.resize(film, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    encoded = cv2.imencode(".png", film, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
    return "data:image/png;base64," + base64.b64encode(encoded).decode()


def _follow(settings: Settings, alias: str) -> ModelHolder:
    """A holder of the version with `alias`, following the registry."""
    return ModelHolder(
        settings.model_name,
        alias,
        settings.tracking_uri,
        registry_timeout=settings.registry_timeout,
        load_timeout=settings.load_timeout,
        ui_url=settings.ui_url,
    )


def create_app(
    settings: Settings | None = None,
    holder: ModelHolder | None = None,
    challenger: ModelHolder | bool | None = None,
) -> FastAPI:
    """The webapp. `holder` and `challenger` (the challenger alias's holder; False for none)
    default to ones that follow the registry."""
    settings = settings or get_settings()
    # A registry that hangs must not hold a refresh for minutes (MLflow's default retries).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.registry_timeout)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    cv2.setNumThreads(1)  # one image per thread; workers share the cores, not each image
    return_freed_buffers_to_the_system()  # resident memory follows the images in flight
    holder = holder or _follow(settings, settings.model_alias)
    limits = Limits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=int(settings.max_megapixels * 1_000_000),
        max_aspect=settings.max_aspect_ratio,
    )
    admission = Admission(settings.max_in_flight, int(settings.decode_budget_mb * 2**20))
    metrics = Metrics()
    explain_pool = ThreadPoolExecutor(1, "hm-explain", initializer=lower_priority)
    maps = Admission(MAX_EXPLAINS_WAITING, budget=2**62)  # counted; memory is `admission`'s
    configure_logging()
    store = PredictionLog(settings.prediction_log_uri) if settings.record_predictions else None
    recorder = None
    if store is not None:
        films = FilmStore(settings.film_store_uri) if settings.keep_films else None
        recorder = Recorder(
            store,
            films,
            settings.log_queue,
            int(settings.film_queue_mb * 2**20),
            metrics.recorder_counters(),
        )
    shadow = None
    if recorder is not None and settings.shadow and challenger is not False:
        challenger = challenger or _follow(settings, settings.challenger_alias)
        shadow = Shadow(challenger, recorder, metrics.shadow)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [
            asyncio.create_task(_refresh_loop(holder, settings.refresh_seconds, metrics.serving))
        ]
        if shadow is not None:
            tasks.append(
                asyncio.create_task(_refresh_loop(shadow.holder, settings.refresh_seconds))
            )
        if recorder is not None:
            recorder.start()
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        explain_pool.shutdown(wait=False, cancel_futures=True)
        if shadow is not None:
            shadow.shutdown()
        if recorder is not None:
            await asyncio.to_thread(recorder.stop, 5.0)

    app = FastAPI(title="hm-mlflow chest X-ray classifier", version=__version__, lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.recorder = recorder
    app.state.shadow = shadow
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["datetime"] = _readable_time
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_upload_bytes,
        on_reject=lambda reason: metrics.rejections.labels(reason).inc(),
    )
    app.add_middleware(AccessLog, metrics=metrics)

    def unavailable() -> UploadError:
        """Why nothing is served: withdrawn, no registry, or no Production version yet."""
        if holder.state == WITHDRAWN:
            return UploadError(
                503, WITHDRAWN_MESSAGE.format(alias=settings.model_alias), "withdrawn"
            )
        if holder.registry_reachable is False:
            return UploadError(503, NO_REGISTRY, "registry_unreachable")
        if holder.state == LOADING:
            return UploadError(503, LOADING_MESSAGE, "loading")
        message = NO_MODEL.format(
            name=settings.model_name, alias=settings.model_alias, seconds=settings.refresh_seconds
        )
        return UploadError(503, message, "no_model")

    async def classify(
        request: Request, file: UploadFile | None, work=_predict, pool: Executor | None = None
    ) -> Classified:
        """Check the upload from its header, reserve what its decode takes, then run `work`
        (serving model, image bytes) -> answer, by default the prediction, with the model read
        once for this request, in `pool` (default: the thread pool). The whole body is read
        into memory only after the checks and the reservation."""
        if file is None:
            raise UploadError(
                400,
                "No file was sent: attach the image as the form field 'file'.",
                "no_file",
            )
        serving: ServingModel | None = holder.current
        if serving is None:
            raise unavailable()
        size = file.size if file.size is not None else len(await file.read())
        await file.seek(0)
        head = await file.read(HEAD_BYTES)
        await file.seek(max(size - TAIL_BYTES, 0))
        tail = await file.read(TAIL_BYTES)
        inspected = inspect(head, tail, size, limits)
        cost = size + inspected.decode_bytes()
        if not admission.try_enter(cost):
            raise UploadError(503, BUSY, "busy")
        metrics.in_flight.inc()
        try:
            await file.seek(0)
            data = await file.read()
            job = partial(_prepare_and_run, data, inspected, serving, work)
            if pool is None:
                image, answer, digest = await run_in_threadpool(job)
            else:
                image, answer, digest = await asyncio.get_running_loop().run_in_executor(pool, job)
        except ValueError as exc:  # the model's decoder refused what the checks let through
            raise UploadError(
                422, f"The image could not be read; it may be damaged ({exc}).", "undecodable"
            ) from exc
        except NotExplainable as exc:
            raise UploadError(
                409, NOT_EXPLAINABLE.format(version=serving.version), "no_map"
            ) from exc
        except ModelFailure as exc:
            log.error("model %s failed: %s", serving.version, exc)
            raise UploadError(503, MODEL_FAILED, "model_failure") from exc
        finally:
            admission.leave(cost)
            metrics.in_flight.dec()
        request.state.model_version = serving.version
        return Classified(image, answer, serving, data, digest, cost)

    def _prepare_and_run(data: bytes, inspected: Inspected, serving: ServingModel, work):
        """All three steps in one worker thread: one hop from the event loop per image."""
        image = prepare(data, inspected, limits)
        answer = work(serving, image.data)
        return image, answer, hashlib.sha256(data).hexdigest()

    def remember(
        done: Classified, probability: float, summary, site: str, source: str
    ) -> str | None:
        """Hand the answer to the prediction log (and the film to the film store, the film to
        the challenger), off the request path; its prediction id, or None with the log off."""
        if recorder is None:
            return None
        serving, image = done.serving, done.image
        prediction_id = uuid.uuid4().hex
        film = None
        if recorder.films is not None:
            kept = image.data if image.format == "DICOM" else done.upload
            film = Film(recorder.films.key(done.sha256, image.format), kept, image.format)
        recorder.record(
            Record(
                id=prediction_id,
                created_at=now(),
                site=site,
                source=source,
                model_name=serving.name,
                model_version=serving.version,
                probability=probability,
                label=serving.label_of(probability, site),
                threshold=serving.threshold_for(site),
                sha256=done.sha256,
                width=image.width,
                height=image.height,
                format=image.format,
                summary=summary,
                film=recorder.films.location(film.key) if film else None,
            ),
            film,
        )
        if shadow is not None:
            shadow.submit(prediction_id, image.data, done.cost, serving.version, site)
        return prediction_id

    def site_of(form_site: str | None, header_site: str | None) -> str:
        """The client's site: the form field, else the header, else the default."""
        try:
            return check_site(form_site if form_site is not None else header_site)
        except ValueError as exc:
            raise UploadError(422, str(exc), "bad_site") from exc

    def refused(request: Request, error: UploadError) -> None:
        request.state.outcome = error.reason
        metrics.rejections.labels(error.reason).inc()

    def page(request: Request, status: int = 200, **context) -> HTMLResponse:
        """The page; with a result, the footer describes the version that gave it."""
        serving = context.pop("serving", None) or holder.current
        return templates.TemplateResponse(
            request,
            "index.html",
            status_code=status,
            context={
                "model": serving.describe() | _run_date(serving) if serving else None,
                "about": serving.about if serving else None,
                "no_model": None if serving else unavailable().message,
                "max_mb": settings.max_upload_mb,
                "max_files": settings.max_batch_files,
                "caption": CAPTION,
                **context,
            },
        )

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        return page(request)

    @app.post("/", response_class=HTMLResponse)
    async def submit(
        request: Request, file: Upload = None, site: SiteField = None, x_site: SiteHeader = None
    ) -> HTMLResponse:
        try:
            where = site_of(site, x_site)
            done = await classify(request, file)
        except UploadError as exc:
            refused(request, exc)
            return page(request, exc.status, error=exc.message, site=site)
        image, prediction, serving = done.image, done.answer, done.serving
        prediction_id = remember(done, prediction.probability, prediction.summary, where, "page")
        result = {
            "prediction_id": prediction_id,
            "site": where,
            "label": serving.label_of(prediction.probability, where),
            "probability": prediction.probability,
            "threshold": serving.threshold_for(where),
            "thumbnail": await run_in_threadpool(_thumbnail, prediction, image),
            "filename": file.filename,
            "format": image.format,
            "width": image.width,
            "height": image.height,
            "version": prediction.version,
        }
        return page(request, result=result, serving=serving, site=where)

    def api_error(request: Request, exc: UploadError) -> JSONResponse:
        refused(request, exc)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    def model_of(
        prediction: Prediction | Explanation, serving: ServingModel, prediction_id, site
    ) -> dict:
        return {
            "prediction_id": prediction_id,
            "site": site,
            "label": serving.label_of(prediction.probability, site),
            "probability": prediction.probability,
            "threshold": serving.threshold_for(site),
            "model": {"name": settings.model_name, "version": serving.version},
        }

    @app.post("/api/predict")
    async def predict(
        request: Request,
        file: Upload = None,
        thumbnail: bool = False,
        site: SiteField = None,
        x_site: SiteHeader = None,
    ) -> JSONResponse:
        """Label and probability of one film, with the prediction id a reader's label refers
        to; `?thumbnail=true` adds the film as the model cropped it (a small PNG data URL), for
        the upload page's table."""
        try:
            where = site_of(site, x_site)
            done = await classify(request, file)
        except UploadError as exc:
            return api_error(request, exc)
        prediction = done.answer
        prediction_id = remember(done, prediction.probability, prediction.summary, where, "api")
        answer = model_of(prediction, done.serving, prediction_id, where)
        if thumbnail:
            answer["thumbnail"] = await run_in_threadpool(_thumbnail, prediction, done.image)
        return JSONResponse(answer)

    @app.post("/api/explain")
    async def explain(
        request: Request, file: Upload = None, site: SiteField = None, x_site: SiteHeader = None
    ) -> JSONResponse:
        """Where the model looked: the occlusion map of one film under the served version, as
        numbers and as a PNG overlay on the model's canvas. Maps are computed one at a time per
        worker, in a thread of lower priority than the predictions."""
        try:
            where = site_of(site, x_site)
        except UploadError as exc:
            return api_error(request, exc)
        if not maps.try_enter(0):
            return api_error(request, UploadError(503, BUSY_EXPLAINING, "busy"))
        try:
            done = await classify(request, file, _explain_and_summarise, explain_pool)
        except UploadError as exc:
            return api_error(request, exc)
        finally:
            maps.leave(0)
        explanation, summary = done.answer
        prediction_id = remember(done, explanation.probability, summary, where, "explain")
        overlay = await run_in_threadpool(explanation.overlay_png)
        return JSONResponse(
            {
                **model_of(explanation, done.serving, prediction_id, where),
                "occlusion": explanation.as_dict(),
                "overlay_png": base64.b64encode(overlay).decode(),
                "caption": CAPTION,
            }
        )

    def status() -> dict:
        """The holder's status, the prediction log's and the challenger's: a log that cannot
        be written makes the service degraded (its answers go on)."""
        found = holder.status()
        log_status = recorder.status() if recorder is not None else {"status": "off"}
        found["prediction_log"] = log_status
        found["challenger"] = shadow.version if shadow is not None else None
        # which worker answered, of how many: hm_mlflow.readiness waits for each of them
        found["worker"] = {"pid": os.getpid(), "of": settings.n_web_workers}
        if log_status["status"] == "failing":
            found["status"] = "degraded"
        return found

    @app.get("/health")
    def health() -> dict:
        return status()

    @app.get("/ready")
    def ready() -> JSONResponse:
        found = status()
        return JSONResponse(found, status_code=200 if found["model_loaded"] else 503)

    loop = loop_routes(settings, store, recorder, holder, shadow, metrics, templates)
    app.include_router(loop.router)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body + await loop.site_metrics(), media_type=content_type)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A malformed request (not multipart, a broken form): 400 with a sentence."""
        refused(request, UploadError(400, "", "bad_request"))
        message = (
            "The request could not be read: send the image as multipart/form-data in the "
            "field 'file'."
        )
        return JSONResponse({"detail": message}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Whatever slipped through: logged with its trace here, a sentence for the client."""
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        request.state.outcome = "unexpected"
        return JSONResponse(
            {"detail": "The server could not handle this request; try again."},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    return app
