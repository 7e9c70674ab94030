"""The webapp: an upload page for people, a JSON API for programs, both on the Production model.

Routes stay thin: checks live in `uploads`, the model in `model_holder`; the model does its own
preprocessing, so this module never touches features.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from hm_mlflow import __version__
from hm_mlflow.config import Settings, get_settings
from hm_mlflow.serve.model_holder import ModelHolder, ServingModel
from hm_mlflow.serve.uploads import CheckedImage, UploadError, check_upload

log = logging.getLogger(__name__)
Upload = Annotated[UploadFile | None, File(description="the image, JPEG or PNG")]
HERE = Path(__file__).parent
NO_MODEL = (
    "No model is in production yet: the registry has no version of {name} with the "
    "alias '{alias}'. Train one (hm-mlflow train); it is picked up within {seconds:g} s."
)
NO_REGISTRY = "No model is loaded: the model registry cannot be reached ({error}). Retrying."


async def _refresh_loop(holder: ModelHolder, seconds: float) -> None:
    """Follow the registry alias; look more often while there is nothing to serve."""
    while True:
        await asyncio.to_thread(holder.refresh)
        await asyncio.sleep(seconds if holder.current else min(seconds, 5.0))


def _readable_time(iso: str) -> str:
    """2026-11-24T00:47:45+00:00 -> 2026-11-24 00:47 UTC"""
    try:
        moment = datetime.fromisoformat(iso).astimezone(UTC)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None) -> FastAPI:
    settings = settings or get_settings()
    holder = holder or ModelHolder(settings.model_name, settings.model_alias, settings.tracking_uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_refresh_loop(holder, settings.refresh_seconds))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="hm-mlflow chest X-ray classifier", version=__version__, lifespan=lifespan)
    app.state.holder = holder
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["datetime"] = _readable_time

    def no_model() -> str:
        """Why nothing is served: an unreachable registry, or no Production version yet."""
        if holder.last_error:
            return NO_REGISTRY.format(error=holder.last_error)
        return NO_MODEL.format(
            name=settings.model_name, alias=settings.model_alias, seconds=settings.refresh_seconds
        )

    async def read_checked(file: UploadFile | None) -> CheckedImage:
        if file is None:
            raise UploadError(400, "No file was sent: attach the image as the form field 'file'.")
        data = await file.read(settings.max_upload_bytes + 1)
        return await run_in_threadpool(check_upload, data, settings.max_upload_bytes)

    async def classify(image: CheckedImage) -> tuple[ServingModel, str, float]:
        serving = holder.current
        if serving is None:
            raise UploadError(503, no_model())
        try:
            label, probability = await run_in_threadpool(serving.predict, image.data)
        except ValueError as exc:  # the model's decoder refused what the checks let through
            raise UploadError(422, f"The model could not read this image: {exc}") from exc
        return serving, label, probability

    def page(request: Request, status: int = 200, **context) -> HTMLResponse:
        serving = holder.current
        return templates.TemplateResponse(
            request,
            "index.html",
            status_code=status,
            context={
                "model": serving.describe() if serving else None,
                "no_model": None if serving else no_model(),
                "max_mb": settings.max_upload_mb,
                **context,
            },
        )

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        return page(request)

    @app.post("/", response_class=HTMLResponse)
    async def submit(request: Request, file: Upload = None) -> HTMLResponse:
        try:
            image = await read_checked(file)
            serving, label, probability = await classify(image)
        except UploadError as exc:
            return page(request, exc.status, error=exc.message)
        result = {
            "label": label,
            "probability": probability,
            "thumbnail": image.thumbnail,
            "filename": file.filename,
            "width": image.width,
            "height": image.height,
            "version": serving.version,
        }
        return page(request, result=result)

    @app.post("/api/predict")
    async def predict(file: Upload = None) -> JSONResponse:
        try:
            image = await read_checked(file)
            serving, label, probability = await classify(image)
        except UploadError as exc:
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        return JSONResponse(
            {
                "label": label,
                "probability": probability,
                "model": {"name": serving.name, "version": serving.version},
            }
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **holder.status()}

    return app
