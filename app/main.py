"""The FastAPI application: `create_app(settings)`; `app` for `uvicorn app.main:app`.

The model is loaded in the lifespan (not at import), and the trainer thread started there; on
shutdown (SIGTERM) the trainer finishes its current step and the current version is checkpointed, and the
ONNX Runtime sessions still being built are waited for.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount, Route

from app.api.errors import install_error_handlers
from app.api.openapi import install_openapi
from app.api.routes import detect, finetune, health, label_studio, model, score_loss, v2, validation
from app.core.metrics import Metrics
from app.core.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.core.settings import Settings, load_settings
from app.labelstudio.backend import start_label_studio
from app.online.worker import start_worker
from app.serving.export import remove_leftover_exports
from app.serving.inference import InferenceWorker, batch_policy
from app.serving.model_host import initial_model, start_host
from app.serving.model_origin import log_served_model
from app.serving.replica import start_watcher
from ssd_core.storage.checkpoint import CheckpointStore

logger = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        return version("ssd-service")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    metrics: Metrics = app.state.metrics
    # a server only reads the trainer's directory (and must not remove its temp files: writes in flight)
    read_only = settings.role == "server"
    store = (CheckpointStore(settings.checkpoint_dir, settings.checkpoint_keep, read_only=read_only)
             if settings.checkpoint_dir else None)
    app.state.store = store
    model, checkpoint = await run_in_threadpool(initial_model, settings, store)
    host = await run_in_threadpool(start_host, settings, metrics, model, checkpoint, store)
    await run_in_threadpool(remove_leftover_exports)  # a kill -9 during an export leaves its directory
    app.state.host = host
    log_served_model(settings, host.device, checkpoint)
    app.state.inference = InferenceWorker(host, batch_policy(settings), metrics)
    if settings.role != "server":  # the trainer takes over `model`; the host serves its own copy
        app.state.worker = await run_in_threadpool(start_worker, host, model, store, checkpoint, settings, metrics)
    else:  # follows the trainer's checkpoints (settings guarantee a checkpoint directory)
        app.state.watcher = start_watcher(host, store, settings, metrics, synced=checkpoint is not None)
    app.state.label_studio = start_label_studio(settings, metrics, getattr(app.state, "worker", None))
    try:
        yield
    finally:
        await run_in_threadpool(app.state.label_studio.stop, settings.shutdown_timeout_s)
        await run_in_threadpool(app.state.inference.stop, settings.shutdown_timeout_s)
        watcher = getattr(app.state, "watcher", None)
        if watcher is not None:
            await run_in_threadpool(watcher.stop, settings.shutdown_timeout_s)
        worker = getattr(app.state, "worker", None)
        if worker is not None:
            await run_in_threadpool(worker.stop, settings.shutdown_timeout_s)
        if not await run_in_threadpool(host.finish_builds, settings.shutdown_timeout_s):
            logger.warning("an ONNX Runtime session was still being built after %s s", settings.shutdown_timeout_s)


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the application (nothing heavy happens before the lifespan starts).

    Args:
        settings: defaults to the `SSD_*` environment.
        registry: Prometheus registry for this app's metrics; a fresh one by default.
    """
    settings = settings or load_settings()
    app = FastAPIOffline(  # /docs and /redoc with Swagger UI and ReDoc served from the package: no CDN
        title="ssd-service",
        version=_package_version(),
        description="SSD MultiBoxLoss scoring, online fine-tuning and detection.",
        lifespan=lifespan,
    )
    metrics = Metrics(registry or CollectorRegistry(), settings.object_class_names())
    metrics.build.info({"version": app.version, "torch": torch.__version__})
    app.state.settings = settings
    app.state.metrics = metrics
    routers = (score_loss.router, finetune.router, validation.router, detect.router, model.router, health.router,
               v2.router, label_studio.router)
    routes = [route for route in app.routes if isinstance(route, Route | Mount)]  # /docs, its assets, ...
    for router in routers:
        app.include_router(router)
        routes.extend(router.routes)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       stall_timeout_s=settings.body_stall_timeout_s, metrics=metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=routes)  # outermost: sees 413s
    return app


app = create_app()
